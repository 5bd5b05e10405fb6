//! [`ClusterNode`]: one node's part of the cluster — its identity, its
//! links, the metadata Raft group — and the answers it gives peers
//! ([`RequestHandler`]): Raft RPCs, commits forwarded to the leader, joins
//! and status.
//!
//! Writes go to the leader: a node that is not the leader forwards the
//! command over its link, then waits until it has applied the entry itself,
//! so a client that got `declare-ok` from a node reads its own change there.
//! A leader that has not heard from a majority within
//! [`QUORUM_SILENCE`] refuses new commands at once
//! (`MetaError::Unavailable`) rather than appending what it could not
//! commit.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Raft, ServerState};
use server::meta::MetaError;

use crate::gossip::{GossipView, SharedView};
use crate::identity::NodeInfo;
use crate::link::{Links, RequestHandler};
use crate::meta_group::{META_GROUP, MetaMachine, MetaRequest, MetaResponse, MetaTypes};
use crate::queue_group::{QueueRequest, QueueResponse};
use crate::rpc::{Request, Response, Status};

/// This node's consumers of queues elsewhere: key -> (home, sink).
pub(crate) type RemoteSinks =
    std::collections::HashMap<u64, (String, Arc<dyn server::peers::RemoteSink>)>;

/// How long a leader may go without a majority's acknowledgement before it
/// refuses new commands.
pub const QUORUM_SILENCE: Duration = Duration::from_millis(600);
/// How long a commit may take before it is reported unavailable.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `quorum_status` waits for a member's node before showing it
/// `noproc`.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Most voting members; more nodes join as learners.
pub const MAX_VOTERS: usize = 5;

/// This node's part of the cluster.
pub struct ClusterNode {
    /// Who we are.
    pub me: NodeInfo,
    /// Links to peers.
    pub links: Arc<Links>,
    /// The metadata group.
    pub raft: Raft<MetaTypes>,
    /// Its state machine.
    pub machine: MetaMachine,
    /// The cluster's name.
    pub cluster_name: String,
    /// What gossip last said of the live nodes.
    pub gossip: SharedView,
    /// Commits go through here one at a time, in call order.
    commits: tokio::sync::Mutex<()>,
    /// This node's consumers of queues on other nodes: key -> (home node,
    /// where their deliveries go).
    pub(crate) sinks: parking_lot::Mutex<RemoteSinks>,
    next_key: std::sync::atomic::AtomicU64,
    /// The replicated queues.
    pub replicas: Arc<crate::replica::Replicas>,
    /// When this node last became the metadata leader.
    led_since: parking_lot::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

fn unavailable(text: impl Into<String>) -> MetaError {
    MetaError::Unavailable(text.into())
}

impl ClusterNode {
    pub(crate) fn new(
        me: NodeInfo,
        cluster_name: String,
        links: Arc<Links>,
        raft: Raft<MetaTypes>,
        machine: MetaMachine,
        gossip: SharedView,
        replicas: Arc<crate::replica::Replicas>,
    ) -> ClusterNode {
        let first_key = replicas.first_key();
        ClusterNode {
            replicas,
            me,
            cluster_name,
            links,
            raft,
            machine,
            gossip,
            commits: tokio::sync::Mutex::new(()),
            sinks: parking_lot::Mutex::default(),
            // Keys differ from an earlier run's (a replicated queue's
            // state may still name that run's consumers).
            next_key: std::sync::atomic::AtomicU64::new(first_key),
            led_since: parking_lot::Mutex::default(),
        }
    }

    /// Notes when this node becomes the metadata leader (a hand-over
    /// waits until it has led for openraft's lease), while `node` lives.
    pub(crate) async fn follow_leadership(node: std::sync::Weak<ClusterNode>) {
        let Some(mut server) = node.upgrade().map(|n| n.raft.server_metrics()) else {
            return;
        };
        let mut led_term = None;
        loop {
            let (leads, term) = {
                let m = server.borrow_and_update();
                (m.state == ServerState::Leader, m.vote.leader_id().term)
            };
            let Some(n) = node.upgrade() else {
                return;
            };
            if leads && led_term != Some(term) {
                led_term = Some(term);
                *n.led_since.lock() = Some(std::time::Instant::now());
            }
            drop(n);
            if server.changed().await.is_err() {
                return;
            }
        }
    }

    /// The metadata leader, if known.
    pub fn leader(&self) -> Option<NodeInfo> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        m.membership_config.membership().get_node(&id).cloned()
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> Status {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let mut status = Status {
            node: self.me.clone(),
            leader: m.current_leader,
            term: m.current_term,
            applied: m.last_applied.map_or(0, |l| l.index),
            majority: self.has_majority(),
            ..Status::default()
        };
        for (id, node) in membership.nodes() {
            if voters.contains(id) {
                status.voters.push(node.clone());
            } else {
                status.learners.push(node.clone());
            }
        }
        status
    }

    /// Whether member `n` is running as this node sees it: itself, a live
    /// link to it, or gossip's failure detector deems it live (another node
    /// hears from it: a partition from here).
    pub fn running(&self, n: &NodeInfo, view: &GossipView) -> bool {
        n.id == self.me.id || self.links.is_connected(n.id) || view.live.contains_key(&n.name)
    }

    /// Whether this node belongs to a formed cluster (has a membership).
    pub fn is_member(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.membership_config
            .membership()
            .get_node(&self.me.id)
            .is_some()
    }

    /// Commits `request` through the leader and waits until this node has
    /// applied it.
    pub async fn commit(&self, request: MetaRequest) -> Result<MetaResponse, MetaError> {
        let _order = self.commits.lock().await;
        let (response, index) = tokio::time::timeout(COMMIT_TIMEOUT, self.commit_at_leader(request))
            .await
            .map_err(|_| {
                unavailable(format!(
                    "metadata commit timed out after {} s: this node ({}) cannot reach a majority of the cluster; the change may or may not take effect",
                    COMMIT_TIMEOUT.as_secs(),
                    self.me.name
                ))
            })??;
        self.raft
            .wait(Some(COMMIT_TIMEOUT))
            .applied_index_at_least(Some(index), "a forwarded commit applied here")
            .await
            .map_err(|e| unavailable(format!("committed but not applied here in time: {e}")))?;
        Ok(response)
    }

    async fn commit_at_leader(
        &self,
        request: MetaRequest,
    ) -> Result<(MetaResponse, u64), MetaError> {
        let mut request = Some(request);
        for _ in 0..5 {
            let Some(leader) = self.leader() else {
                return Err(unavailable(format!(
                    "metadata changes are unavailable: node {} knows no leader (no majority of the cluster reachable)",
                    self.me.name
                )));
            };
            let Some(req) = request.take() else {
                break;
            };
            if leader.id == self.me.id {
                return self.write_as_leader(req).await;
            }
            let (_, response) = self
                .links
                .request(
                    Some(leader.id),
                    &leader.cluster_addr,
                    &Request::Commit(req.clone()),
                    COMMIT_TIMEOUT,
                )
                .await
                .map_err(|e| {
                    unavailable(format!("metadata leader {} unreachable: {e}", leader.name))
                })?;
            match response {
                Response::Committed { outcome, index } => return Ok((outcome, index)),
                Response::NotLeader(_) => {
                    // Leadership moved: wait for the new leader and retry.
                    request = Some(req);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Response::Unavailable(text) => return Err(unavailable(text)),
                other => {
                    return Err(unavailable(format!(
                        "unexpected answer from the leader: {other:?}"
                    )));
                }
            }
        }
        Err(unavailable("metadata leadership keeps moving; try again"))
    }

    /// Whether this node is in contact with a majority: as the leader, a
    /// majority acknowledged it within [`QUORUM_SILENCE`]; otherwise it
    /// knows a leader.
    pub fn has_majority(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return m.current_leader.is_some();
        }
        let voters = m.membership_config.membership().voter_ids().count();
        voters <= 1
            || m.millis_since_quorum_ack
                .is_some_and(|ms| ms <= QUORUM_SILENCE.as_millis() as u64)
    }

    /// This node leads and no follower has acknowledged it yet.
    fn newly_elected(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.state == ServerState::Leader && m.millis_since_quorum_ack.is_none()
    }

    /// Appends as the leader, if it still has a majority. (A command
    /// refused here was appended nowhere. One appended just before the
    /// majority was lost may still commit once it returns: its caller times
    /// out with "may or may not take effect", as with RabbitMQ's Khepri.)
    async fn write_as_leader(
        &self,
        request: MetaRequest,
    ) -> Result<(MetaResponse, u64), MetaError> {
        if !self.has_majority() && self.newly_elected() {
            // Elected a moment ago: no follower has acknowledged it yet.
            // That comes with the first heartbeat; a leader that has lost
            // its majority (acknowledged once, silent since) is refused at
            // once instead.
            let _ = self
                .raft
                .wait(Some(QUORUM_SILENCE))
                .metrics(
                    |m| m.state != ServerState::Leader || m.millis_since_quorum_ack.is_some(),
                    "a newly elected leader's first quorum acknowledgement",
                )
                .await;
        }
        if !self.has_majority() {
            let voters = self.status().voters.len();
            return Err(unavailable(format!(
                "metadata changes are refused: node {} has not heard from a majority of the cluster's {voters} voting nodes",
                self.me.name
            )));
        }
        match self.raft.client_write(request).await {
            Ok(r) => Ok((r.data, r.log_id.index)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(unavailable("metadata leadership moved; try again"))
            }
            Err(e) => Err(unavailable(format!("metadata commit failed: {e}"))),
        }
    }

    /// As the leader: adds `node` as a learner, then makes voters of
    /// learners until there are as many as the cluster should have.
    pub async fn add_member(&self, node: NodeInfo) -> Result<(), String> {
        if let Some(name) = self.machine.forgotten(node.id) {
            return Err(format!(
                "node '{name}' ({}) was forgotten by the cluster",
                node.id
            ));
        }
        // A node that lost its data comes back under its old name with a
        // new id: two members of one name would leave the old one voting
        // for good and make the name ambiguous, so the old one must go first.
        let status = self.status();
        if let Some(old) = status
            .voters
            .iter()
            .chain(status.learners.iter())
            .find(|n| n.name == node.name && n.id != node.id)
        {
            return Err(format!(
                "a node named '{}' is already a member (id {}); if it lost its data, run forget_cluster_node {} on a node of the cluster first",
                old.name, old.id, old.name
            ));
        }
        self.raft
            .add_learner(node.id, node.clone(), true)
            .await
            .map_err(|e| e.to_string())?;
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let all = membership.nodes().count();
        let want = if all >= 5 {
            5
        } else if all >= 3 {
            3
        } else {
            all
        }
        .min(MAX_VOTERS);
        if voters.len() < want {
            let promote: BTreeSet<u64> =
                membership.learner_ids().take(want - voters.len()).collect();
            if !promote.is_empty() {
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(promote), false)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        tracing::info!(node = %node, "node joined the cluster");
        Ok(())
    }

    /// As the leader: removes node `name` for good.
    pub async fn forget(&self, name: &str) -> Result<(), MetaError> {
        let status = self.status();
        let Some(node) = status
            .voters
            .iter()
            .chain(status.learners.iter())
            .find(|n| n.name == name)
            .cloned()
        else {
            return Err(MetaError::NotFound(format!(
                "no node '{name}' in the cluster"
            )));
        };
        if node.id == self.me.id {
            return Err(MetaError::Invalid("a node cannot forget itself".into()));
        }
        self.commit(MetaRequest::Forget {
            id: node.id,
            name: node.name.clone(),
        })
        .await?;
        let ids: BTreeSet<u64> = [node.id].into();
        let change = if status.voters.iter().any(|v| v.id == node.id) {
            ChangeMembers::RemoveVoters(ids.clone())
        } else {
            ChangeMembers::RemoveNodes(ids.clone())
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if status.voters.iter().any(|v| v.id == node.id) {
            let _ = self
                .raft
                .change_membership(ChangeMembers::RemoveNodes(ids), false)
                .await;
        }
        self.links.disconnect(node.id);
        tracing::info!(node = %node, "node forgotten");
        self.shrink_all(&node).await;
        Ok(())
    }

    /// Takes forgotten node `node` out of every replicated queue it held a
    /// replica of, as RabbitMQ's `forget_cluster_node` shrinks every quorum
    /// queue: their groups stop counting it, and a new node that later
    /// joins under its name is not taken for a member with a replica it
    /// never had. A queue whose only replica it was is left as it is (it
    /// is gone with the node; deleting it is the operator's call).
    async fn shrink_all(&self, node: &NodeInfo) {
        // Together: one that cannot commit (the node was one of two) waits
        // out its timeout without holding up the others.
        let shrinks = self
            .replicas
            .with_member(&node.name)
            .into_iter()
            .map(|q| self.shrink(q, node));
        futures_util::future::join_all(shrinks).await;
    }

    /// [`shrink_all`](Self::shrink_all) for one queue.
    async fn shrink(&self, q: Arc<crate::replica::Replicated>, node: &NodeInfo) {
        if q.members().len() <= 1 {
            tracing::warn!(queue = %q.name, vhost = %q.vhost, node = %node.name, "the forgotten node held the queue's only replica: left as it is");
            return;
        }
        let removed = async {
            self.replicas
                .change_voters_at_leader(&q, node.clone(), false)
                .await?;
            let Some(mut def) = self.machine.state().queue(&q.vhost, &q.name).cloned() else {
                return Ok(());
            };
            def.members.retain(|m| *m != node.name);
            let command = server::meta::MetaCommand::DeclareQueue {
                vhost: q.vhost.clone(),
                queue: def,
            };
            match self.commit(MetaRequest::Command(command.to_wire())).await {
                Ok(r) => match r.result {
                    Some(Err(e)) => Err(MetaError::from(e).to_string()),
                    _ => Ok(()),
                },
                Err(e) => Err(e.to_string()),
            }
        };
        match removed.await {
            Ok(()) => {
                tracing::info!(queue = %q.name, vhost = %q.vhost, node = %node.name, "forgotten node's replica removed")
            }
            Err(e) => {
                tracing::warn!(queue = %q.name, vhost = %q.vhost, node = %node.name, error = %e, "cannot remove the forgotten node's replica")
            }
        }
    }

    /// The name of member `id`.
    pub fn name_of(&self, id: u64) -> Option<String> {
        crate::replica::ReplicaHost::member(self, id).map(|n| n.name)
    }

    /// The cluster address of the member called `name`.
    pub fn address_of(&self, name: &str) -> Option<String> {
        crate::replica::ReplicaHost::member_named(self, name).map(|n| n.cluster_addr)
    }

    /// Whether this node is the metadata leader now.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// Hands the metadata group's leadership to another voter if this
    /// node leads it (the node is stopping gracefully; see `handover`).
    pub async fn hand_over_metadata(&self) {
        use crate::handover::{HandOver, ask_to_stand, hand_over};
        let led_for = self.led_since.lock().map(|t| t.elapsed());
        let outcome = hand_over(&self.raft, self.me.id, led_for, |to| async move {
            let addr = crate::replica::ReplicaHost::member(self, to)
                .map(|m| m.cluster_addr)
                .ok_or_else(|| format!("node {to} is not a known member"))?;
            ask_to_stand(&self.links, &addr, META_GROUP).await
        })
        .await;
        match outcome {
            HandOver::To(id) => {
                let to = crate::replica::ReplicaHost::member(self, id).map(|m| m.name);
                tracing::info!(
                    to = to.as_deref().unwrap_or("?"),
                    "stopping: handed the metadata leadership over"
                );
            }
            HandOver::Failed(why) => tracing::warn!(
                why,
                "stopping: the metadata leadership was not handed over; the other nodes elect a leader once this node has gone"
            ),
            HandOver::NotLeader => {}
        }
    }
}

impl crate::replica::ReplicaHost for ClusterNode {
    fn member(&self, id: u64) -> Option<NodeInfo> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        m.membership_config.membership().get_node(&id).cloned()
    }

    fn member_named(&self, name: &str) -> Option<NodeInfo> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        m.membership_config
            .membership()
            .nodes()
            .find(|(_, n)| n.name == name)
            .map(|(_, n)| n.clone())
    }

    fn local_sink(&self, key: u64) -> Option<Arc<dyn server::peers::RemoteSink>> {
        self.sinks.lock().get(&key).map(|(_, s)| s.clone())
    }

    fn remove_sink(&self, key: u64) -> Option<Arc<dyn server::peers::RemoteSink>> {
        self.sinks.lock().remove(&key).map(|(_, s)| s)
    }
}

/// The server's way to queues on other nodes: an enqueue goes in order on
/// the link to the queue's home node.
#[derive(Debug)]
pub struct ClusterPeers {
    pub(crate) node: Arc<ClusterNode>,
}

impl ClusterPeers {
    /// A replicated queue's group and counts: from this node's replica,
    /// else from a member's.
    fn replicated_status(
        &self,
        q: &Arc<crate::replica::Replicated>,
    ) -> server::peers::RemoteReplicaStatus {
        if let Some(status) = q.local_status(&self.node.replicas) {
            return Box::pin(std::future::ready(Ok(status)));
        }
        let node = self.node.clone();
        let q = q.clone();
        Box::pin(async move {
            let mut last = String::from("no member answered");
            for m in &q.members() {
                let Some(addr) = node.address_of(m) else {
                    continue;
                };
                let answer = node
                    .links
                    .send_ordered(&addr, Request::QueueStatus { group: q.id });
                match answer.await {
                    Ok(Ok(Response::ReplicaStatus(Some(status)))) => return Ok(status),
                    Ok(Ok(other)) => last = format!("node '{m}' answered {other:?}"),
                    Ok(Err(e)) => last = format!("node '{m}': {e}"),
                    Err(_) => last = format!("node '{m}': no answer"),
                }
            }
            Err(last)
        })
    }

    /// A replicated queue's ready messages and consumers.
    fn replicated_counts(
        &self,
        q: &Arc<crate::replica::Replicated>,
    ) -> server::peers::RemoteCounts {
        let status = self.replicated_status(q);
        Box::pin(async move {
            let s = status.await?;
            Ok(Some((
                u32::try_from(s.ready).unwrap_or(u32::MAX),
                u32::try_from(s.consumers).unwrap_or(u32::MAX),
            )))
        })
    }
}

/// What a home node did with a request: done, or its reply code and text.
type HomeOutcome<T> = Result<T, (u16, String)>;

impl ClusterPeers {
    /// Sends `request` (a purge, a delete, a declare) to node `home`, in
    /// order with this node's other requests to it; `answer_of` takes its
    /// outcome out of the response (or describes another response). A
    /// refusal keeps the home node's reply code; not reaching it is code 0.
    fn refusable_request<T: Send + 'static>(
        &self,
        home: &str,
        request: Request,
        answer_of: fn(Response) -> Result<HomeOutcome<T>, String>,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<T, server::peers::Refusal>> + Send>> {
        use server::peers::Refusal;
        let unreachable = |text: String| Refusal { code: 0, text };
        let Some(addr) = self.node.address_of(home) else {
            let text = format!("node '{home}' is not a member of the cluster");
            return Box::pin(std::future::ready(Err(unreachable(text))));
        };
        let answer = self.node.links.send_ordered(&addr, request);
        let home = home.to_owned();
        Box::pin(async move {
            match answer.await {
                Ok(Ok(response)) => match answer_of(response) {
                    Ok(Ok(done)) => Ok(done),
                    Ok(Err((code, text))) => Err(Refusal { code, text }),
                    Err(other) => Err(unreachable(format!("node '{home}' answered {other}"))),
                },
                Ok(Err(e)) => Err(unreachable(format!("node '{home}': {e}"))),
                Err(_) => Err(unreachable(format!("node '{home}': no answer"))),
            }
        })
    }

    /// Sends `request` to node `node` in order with this node's other
    /// requests to it; `answer_of` picks the expected answer out of the
    /// response (or describes an unexpected one).
    fn node_request<T: Send + 'static>(
        &self,
        node: &str,
        request: Request,
        answer_of: fn(Response) -> Result<T, String>,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<T, String>> + Send>> {
        let Some(addr) = self.node.address_of(node) else {
            let text = format!("node '{node}' is not a member of the cluster");
            return Box::pin(std::future::ready(Err(text)));
        };
        let answer = self.node.links.send_ordered(&addr, request);
        let node = node.to_owned();
        Box::pin(async move {
            match answer.await {
                Ok(Ok(response)) => {
                    answer_of(response).map_err(|other| format!("node '{node}' answered {other}"))
                }
                Ok(Err(e)) => Err(format!("node '{node}': {e}")),
                Err(_) => Err(format!("node '{node}': no answer")),
            }
        })
    }

    /// [`refusable_request`](Self::refusable_request) answered by a count.
    fn count_request(&self, home: &str, request: Request) -> server::peers::RemoteCount {
        self.refusable_request(home, request, |r| match r {
            Response::Count(done) => Ok(done),
            other => Err(format!("{other:?}")),
        })
    }
}

impl server::peers::Peers for ClusterPeers {
    fn cluster_name(&self) -> String {
        self.node.cluster_name.clone()
    }

    fn members(&self) -> Vec<server::peers::Member> {
        let status = self.node.status();
        let view = self.node.gossip.read().clone();
        let member = |n: &NodeInfo, voter: bool| {
            let heard = view.live.get(&n.name);
            server::peers::Member {
                name: n.name.clone(),
                amqp_addr: n.amqp_addr.clone(),
                cluster_addr: n.cluster_addr.clone(),
                running: self.node.running(n, &view),
                voter,
                leader: status.leader == Some(n.id),
                stats: heard.and_then(|h| h.stats.clone()),
                partitions: heard.map(|h| h.partitions.clone()).unwrap_or_default(),
            }
        };
        let mut out: Vec<server::peers::Member> = status
            .voters
            .iter()
            .map(|n| member(n, true))
            .chain(status.learners.iter().map(|n| member(n, false)))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn forget(
        &self,
        name: &str,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<(), MetaError>> + Send>> {
        let node = self.node.clone();
        let name = name.to_owned();
        Box::pin(async move {
            if node.is_leader() {
                return node.forget(&name).await;
            }
            let Some(leader) = node.leader() else {
                return Err(unavailable(
                    "no metadata leader: the cluster has no majority",
                ));
            };
            let asked = node
                .links
                .request(
                    Some(leader.id),
                    &leader.cluster_addr,
                    &Request::Forget { name },
                    COMMIT_TIMEOUT,
                )
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            match asked.1 {
                Response::Forgotten(Ok(())) => Ok(()),
                Response::Forgotten(Err(e)) => Err(match e.strip_prefix("NotFound:") {
                    Some(t) => MetaError::NotFound(t.trim().to_owned()),
                    None => unavailable(e),
                }),
                other => Err(unavailable(format!("the leader answered {other:?}"))),
            }
        })
    }

    fn get(
        &self,
        home: &str,
        vhost: &str,
        queue: &amqp_codec::ShortStr,
        ack: bool,
    ) -> server::peers::RemoteGet {
        let replicas = &self.node.replicas;
        if let Some(q) = replicas.by_name(vhost, queue) {
            let request = QueueRequest::Get {
                requester: (replicas.me(), 0),
                no_ack: !ack,
                now_ms: server::queue::now_ms(),
            };
            let answer = replicas.propose(&q, request);
            return Box::pin(async move {
                match answer.await? {
                    QueueResponse::Got(None) => Ok(None),
                    QueueResponse::Got(Some(g)) => Ok(Some(server::peers::RemoteDelivery {
                        seq: g.seq,
                        redelivered: g.redelivered,
                        delivery_count: g.delivery_count,
                        remaining: u32::try_from(g.remaining).unwrap_or(u32::MAX),
                        exchange: amqp_codec::ShortStr::try_from(g.message.exchange())
                            .map_err(|e| e.to_string())?,
                        routing_key: amqp_codec::ShortStr::try_from(g.message.routing_key())
                            .map_err(|e| e.to_string())?,
                        header: g.message.header().clone(),
                        body: g.message.body().clone(),
                    })),
                    other => Err(format!("a get answered {other:?}")),
                }
            });
        }
        let Some(addr) = self.node.address_of(home) else {
            let text = format!("node '{home}' is not a member of the cluster");
            return Box::pin(std::future::ready(Err(text)));
        };
        let request = Request::Get {
            vhost: vhost.to_owned(),
            queue: queue.to_string(),
            ack,
        };
        let answer = self.node.links.send_ordered(&addr, request);
        let home = home.to_owned();
        Box::pin(async move {
            let d = match answer.await {
                Ok(Ok(Response::Got(Ok(Some(d))))) => d,
                Ok(Ok(Response::Got(Ok(None)))) => return Ok(None),
                Ok(Ok(Response::Got(Err(e)))) => return Err(format!("node '{home}': {e}")),
                Ok(Ok(other)) => return Err(format!("node '{home}' answered {other:?}")),
                Ok(Err(e)) => return Err(format!("node '{home}': {e}")),
                Err(_) => return Err(format!("node '{home}': no answer")),
            };
            crate::replica::remote_delivery(d).map(Some)
        })
    }

    fn list_on(&self, node: &str, what: server::peers::Listing) -> server::peers::RemoteListing {
        let listing = self.node_request(node, Request::List(what), |r| match r {
            Response::Listing(listing) => Ok(listing),
            other => Err(format!("{other:?}")),
        });
        Box::pin(async move { listing.await? })
    }

    fn close_connection(&self, node: &str, name: &str, reason: &str) -> server::peers::RemoteClose {
        let request = Request::CloseConnection {
            name: name.to_owned(),
            reason: reason.to_owned(),
        };
        self.node_request(node, request, |r| match r {
            Response::ConnectionClosed(closed) => Ok(closed),
            other => Err(format!("{other:?}")),
        })
    }

    fn flow(&self, home: &str) -> Option<Arc<queue_store::FlowGate>> {
        let addr = self.node.address_of(home)?;
        Some(self.node.links.backlog(&addr).gate.clone())
    }

    fn propose_replica_args(
        &self,
        vhost: &str,
        queue: &amqp_codec::ShortStr,
        args: queue_store::QueueArgs,
    ) -> server::peers::RemoteDone {
        let Some(q) = self.node.replicas.by_name(vhost, queue) else {
            let text = format!("no replicated queue '{queue}' in vhost '{vhost}'");
            return Box::pin(std::future::ready(Err(text)));
        };
        let answer = self.node.replicas.propose(
            &q,
            QueueRequest::SetArgs {
                args: crate::queue_group::WireArgs::of(&args),
                now_ms: server::queue::now_ms(),
            },
        );
        Box::pin(async move { answer.await.map(|_| ()) })
    }

    fn purge(
        &self,
        home: &str,
        vhost: &str,
        queue: &amqp_codec::ShortStr,
    ) -> server::peers::RemoteCount {
        if let Some(q) = self.node.replicas.by_name(vhost, queue) {
            let answer = self.node.replicas.propose(&q, QueueRequest::Purge);
            return Box::pin(async move {
                match answer.await {
                    Ok(QueueResponse::Purged(n)) => Ok(u32::try_from(n).unwrap_or(u32::MAX)),
                    Ok(other) => Err(server::peers::Refusal {
                        code: 0,
                        text: format!("a purge answered {other:?}"),
                    }),
                    Err(text) => Err(server::peers::Refusal { code: 0, text }),
                }
            });
        }
        let request = Request::Purge {
            vhost: vhost.to_owned(),
            queue: queue.to_string(),
        };
        self.count_request(home, request)
    }

    fn delete(
        &self,
        home: &str,
        vhost: &str,
        queue: &amqp_codec::ShortStr,
        if_unused: bool,
        if_empty: bool,
    ) -> server::peers::RemoteCount {
        if let Some(q) = self.node.replicas.by_name(vhost, queue) {
            // A replicated queue is deleted by committing its deletion (its
            // members stop their replicas as they apply it), after its
            // counts are checked.
            let counts = self.replicated_counts(&q);
            let node = self.node.clone();
            let vhost = vhost.to_owned();
            let queue = queue.clone();
            return Box::pin(async move {
                use server::peers::Refusal;
                let (ready, consumers) = counts
                    .await
                    .map_err(|text| Refusal { code: 0, text })?
                    .unwrap_or((0, 0));
                let refuse = |what: &str| Refusal {
                    code: 406,
                    text: format!(
                        "PRECONDITION_FAILED - queue '{queue}' in vhost '{vhost}' {what}"
                    ),
                };
                if if_unused && consumers > 0 {
                    return Err(refuse("in use"));
                }
                if if_empty && ready > 0 {
                    return Err(refuse("not empty"));
                }
                let command = server::meta::MetaCommand::DeleteQueue {
                    vhost: vhost.clone(),
                    name: queue.clone(),
                };
                let request = crate::meta_group::MetaRequest::Command(command.to_wire());
                match node.commit(request).await {
                    Ok(r) => match r.result {
                        Some(Ok(_)) | None => Ok(ready),
                        Some(Err(e)) => {
                            let e = MetaError::from(e);
                            Err(Refusal {
                                code: 0,
                                text: e.to_string(),
                            })
                        }
                    },
                    Err(e) => Err(Refusal {
                        code: 0,
                        text: e.to_string(),
                    }),
                }
            });
        }
        let request = Request::DeleteQueue {
            vhost: vhost.to_owned(),
            queue: queue.to_string(),
            if_unused,
            if_empty,
        };
        self.count_request(home, request)
    }

    fn declare(
        &self,
        home: &str,
        declare: server::peers::RemoteDeclare,
    ) -> server::peers::RemoteDeclared {
        let mut arguments = bytes::BytesMut::new();
        if let Err(e) = declare.arguments.encode(&mut arguments) {
            let refusal = server::peers::Refusal {
                code: 406,
                text: format!("PRECONDITION_FAILED - arguments: {e}"),
            };
            return Box::pin(std::future::ready(Err(refusal)));
        }
        let request = Request::DeclareQueue {
            vhost: declare.vhost,
            queue: declare.queue.to_string(),
            durable: declare.durable,
            auto_delete: declare.auto_delete,
            arguments: arguments.to_vec(),
        };
        self.refusable_request(home, request, |r| match r {
            Response::Declared(done) => Ok(done),
            other => Err(format!("{other:?}")),
        })
    }

    fn counts(
        &self,
        home: &str,
        vhost: &str,
        queue: &amqp_codec::ShortStr,
    ) -> server::peers::RemoteCounts {
        if let Some(q) = self.node.replicas.by_name(vhost, queue) {
            return self.replicated_counts(&q);
        }
        let request = Request::QueueInfo {
            vhost: vhost.to_owned(),
            queue: queue.to_string(),
        };
        // Ordered with this node's enqueues to it: the counts include them.
        self.node_request(home, request, |r| match r {
            Response::QueueInfo(counts) => Ok(counts),
            other => Err(format!("{other:?}")),
        })
    }

    fn settle(
        &self,
        home: &str,
        vhost: &str,
        queue: &amqp_codec::ShortStr,
        queue_id: u64,
        seqs: Vec<u64>,
        how: server::queue::Settle,
    ) {
        let replicas = &self.node.replicas;
        // By id: a classic queue that became replicated under its name is
        // still settled on its old home for what it handed out before.
        if let Some(q) = replicas.get(queue_id) {
            let request = QueueRequest::Settle {
                consumer: (replicas.me(), 0),
                seqs: seqs.clone(),
                how: settle_octet(how),
                now_ms: server::queue::now_ms(),
            };
            let first = replicas.propose(&q, request.clone());
            let replicas = replicas.clone();
            tokio::spawn(async move {
                // Until committed: a settlement lost with a leader would
                // leave its deliveries held by a consumer that has
                // settled them (settling again is harmless).
                replicas
                    .until_committed(&q, request, first, "a settlement")
                    .await;
                // Until now a new leader's second delivery of one of them
                // was a duplicate (settled here, not yet there).
                q.settled(&seqs);
            });
            return;
        }
        let Some(addr) = self.node.address_of(home) else {
            tracing::warn!(node = %home, "settling deliveries of a node that is not a member");
            return;
        };
        let request = Request::Settle {
            vhost: vhost.to_owned(),
            queue: queue.to_string(),
            queue_id,
            seqs,
            how: settle_octet(how),
        };
        // Not waited for: if the link is down, the home node returned them
        // to the queue already.
        self.node.links.send_oneway(&addr, request);
    }

    fn consume(
        &self,
        home: &str,
        c: server::peers::RemoteConsume,
        sink: Arc<dyn server::peers::RemoteSink>,
    ) -> server::peers::RemoteConsumeOk {
        let replicas = &self.node.replicas;
        if let Some(q) = replicas.by_name(&c.vhost, &c.queue) {
            let key = self
                .node
                .next_key
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // No home node: a replicated queue's consumers outlive any one
            // node's link (its leader moves).
            self.node.sinks.lock().insert(key, (String::new(), sink));
            replicas.add_consumer(key, &q, c.cancel_on_failover);
            let request = QueueRequest::Checkout {
                consumer: (replicas.me(), key),
                prefetch: if c.prefetch == 0 {
                    PEER_CONSUMER_WINDOW
                } else {
                    u32::from(c.prefetch)
                },
                no_ack: false,
                priority: c.priority,
                now_ms: server::queue::now_ms(),
            };
            let answer = replicas.propose(&q, request);
            let node = self.node.clone();
            return Box::pin(async move {
                match answer.await {
                    Ok(_) => Ok(key),
                    Err(e) => {
                        node.sinks.lock().remove(&key);
                        node.replicas.remove_consumer(key);
                        Err(e)
                    }
                }
            });
        }
        let Some(addr) = self.node.address_of(home) else {
            let text = format!("node '{home}' is not a member of the cluster");
            return Box::pin(std::future::ready(Err(text)));
        };
        let key = self
            .node
            .next_key
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.node.sinks.lock().insert(key, (home.to_owned(), sink));
        let request = Request::Consume {
            vhost: c.vhost,
            queue: c.queue.to_string(),
            key,
            prefetch: c.prefetch,
            exclusive: c.exclusive,
            priority: c.priority,
            client: c.client,
        };
        let answer = self.node.links.send_ordered(&addr, request);
        let node = self.node.clone();
        let home = home.to_owned();
        Box::pin(async move {
            let result = match answer.await {
                Ok(Ok(Response::Consumed(Ok(())))) => Ok(key),
                Ok(Ok(Response::Consumed(Err(e)))) => Err(e),
                Ok(Ok(other)) => Err(format!("node '{home}' answered {other:?}")),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("node '{home}': no answer")),
            };
            if result.is_err() {
                node.sinks.lock().remove(&key);
            }
            result
        })
    }

    fn replica_status(
        &self,
        vhost: &str,
        queue: &amqp_codec::ShortStr,
    ) -> server::peers::RemoteReplicaStatus {
        match self.node.replicas.by_name(vhost, queue) {
            Some(q) => self.replicated_status(&q),
            None => Box::pin(std::future::ready(Err(format!(
                "no replicated queue '{queue}' in vhost '{vhost}'"
            )))),
        }
    }

    fn raft_metrics(&self) -> Vec<server::peers::RaftMetrics> {
        self.node.replicas.raft_metrics()
    }

    fn quorum_status(
        &self,
        vhost: &str,
        queue: &amqp_codec::ShortStr,
    ) -> server::peers::RemoteQuorumStatus {
        let Some(q) = self.node.replicas.by_name(vhost, queue) else {
            return Box::pin(std::future::ready(Err(format!(
                "no replicated queue '{queue}' in vhost '{vhost}'"
            ))));
        };
        let node = self.node.clone();
        Box::pin(async move {
            // Every member at once, each for itself: one that is down or
            // cut off is `noproc` after the timeout, as RabbitMQ shows it.
            let rows = q.members().into_iter().map(|m| {
                let (node, q) = (node.clone(), q.clone());
                async move {
                    if m == node.me.name {
                        return q
                            .raft_member(&node.replicas)
                            .unwrap_or_else(|| server::peers::QuorumMember::noproc(&m));
                    }
                    let Some(addr) = node.address_of(&m) else {
                        return server::peers::QuorumMember::noproc(&m);
                    };
                    let asked = Request::QueueRaftStatus { group: q.id };
                    match node.links.request(None, &addr, &asked, STATUS_TIMEOUT).await {
                        Ok((_, Response::QueueRaftStatus(Some(row)))) => row,
                        Ok((_, other)) => {
                            tracing::debug!(node = %m, answer = ?other, "no replica status from a member");
                            server::peers::QuorumMember::noproc(&m)
                        }
                        Err(error) => {
                            tracing::debug!(node = %m, %error, "no replica status from a member");
                            server::peers::QuorumMember::noproc(&m)
                        }
                    }
                }
            });
            Ok(futures_util::future::join_all(rows).await)
        })
    }

    fn change_members(
        &self,
        vhost: &str,
        queue: &amqp_codec::ShortStr,
        node: &str,
        add: bool,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<(), server::peers::Refusal>> + Send>> {
        use server::peers::Refusal;
        let refuse =
            |code: u16,
             text: String|
             -> Pin<Box<dyn std::future::Future<Output = Result<(), Refusal>> + Send>> {
                Box::pin(std::future::ready(Err(Refusal { code, text })))
            };
        let Some(q) = self.node.replicas.by_name(vhost, queue) else {
            return refuse(
                404,
                format!("no replicated queue '{queue}' in vhost '{vhost}'"),
            );
        };
        let Some(info) = crate::replica::ReplicaHost::member_named(self.node.as_ref(), node) else {
            return refuse(404, format!("node '{node}' is not a member of the cluster"));
        };
        let members = q.members();
        let present = members.iter().any(|m| m == node);
        if add && present {
            return refuse(
                406,
                format!("node '{node}' is already a member of queue '{queue}' in vhost '{vhost}'"),
            );
        }
        if !add && !present {
            return refuse(
                404,
                format!("node '{node}' is not a member of queue '{queue}' in vhost '{vhost}'"),
            );
        }
        if !add && members.len() == 1 {
            return refuse(
                406,
                format!("node '{node}' is the last member of queue '{queue}' in vhost '{vhost}'"),
            );
        }
        let Some(mut def) = self.node.machine.state().queue(vhost, queue).cloned() else {
            return refuse(404, format!("no queue '{queue}' in vhost '{vhost}'"));
        };
        if add {
            def.members.push(node.to_owned());
        } else {
            def.members.retain(|m| m != node);
        }
        let command = server::meta::MetaCommand::DeclareQueue {
            vhost: vhost.to_owned(),
            queue: def,
        };
        let node = self.node.clone();
        Box::pin(async move {
            let unavailable = |text: String| Refusal { code: 0, text };
            let commit = |command: server::meta::MetaCommand| {
                let node = node.clone();
                async move {
                    let request = crate::meta_group::MetaRequest::Command(command.to_wire());
                    match node.commit(request).await {
                        Ok(r) => match r.result {
                            Some(Err(e)) => Err(MetaError::from(e).to_string()),
                            _ => Ok(()),
                        },
                        Err(e) => Err(e.to_string()),
                    }
                }
            };
            if add {
                // The new member starts its replica as the commit is
                // projected there; the leader then makes it a learner
                // (it catches up) and a voter.
                commit(command).await.map_err(unavailable)?;
                node.replicas
                    .change_voters_at_leader(&q, info, true)
                    .await
                    .map_err(unavailable)
            } else {
                node.replicas
                    .change_voters_at_leader(&q, info, false)
                    .await
                    .map_err(unavailable)?;
                commit(command).await.map_err(unavailable)
            }
        })
    }

    fn cancel(&self, home: &str, key: u64) {
        let sink = self.node.sinks.lock().remove(&key);
        // Its held acknowledgements first (sends to one node keep their
        // order; a replicated queue keeps a cancelled consumer's
        // deliveries until they are settled anyway).
        if let Some((_, sink)) = sink {
            sink.settle_held();
        }
        let replicas = &self.node.replicas;
        if let Some(q) = replicas.remove_consumer(key) {
            // What it holds stays with it until its channel settles it.
            let request = QueueRequest::Cancel {
                consumer: (replicas.me(), key),
                now_ms: server::queue::now_ms(),
            };
            tokio::spawn(replicas.propose(&q, request));
            return;
        }
        if let Some(addr) = self.node.address_of(home) {
            self.node.links.send_oneway(&addr, Request::Cancel { key });
        }
    }

    fn enqueue(&self, home: &str, p: server::peers::RemotePublish) -> server::peers::RemoteOutcome {
        let replicas = &self.node.replicas;
        if let Some(q) = replicas.by_name(&p.vhost, &p.queue) {
            let request = QueueRequest::Enqueue {
                message: crate::queue_group::WireMessage::from_parts(
                    replicas.next_message_id(),
                    p.exchange.to_string(),
                    p.routing_key.to_string(),
                    p.header,
                    p.body,
                ),
                now_ms: server::queue::now_ms(),
            };
            let answer = replicas.propose(&q, request);
            return Box::pin(async move {
                match answer.await? {
                    QueueResponse::Enqueued(taken) => {
                        Ok(server::peers::RemoteEnqueued { refused: !taken })
                    }
                    other => Err(format!("an enqueue answered {other:?}")),
                }
            });
        }
        let Some(addr) = self.node.address_of(home) else {
            let text = format!("node '{home}' is not a member of the cluster");
            return Box::pin(std::future::ready(Err(text)));
        };
        let request = Request::Enqueue(crate::rpc::EnqueueRequest {
            vhost: p.vhost,
            queue: p.queue.to_string(),
            exchange: p.exchange.to_string(),
            routing_key: p.routing_key.to_string(),
            header: p.header,
            body: p.body,
        });
        let answer = self.node.links.send_ordered(&addr, request);
        let home = home.to_owned();
        Box::pin(async move {
            match answer.await {
                Ok(Ok(Response::Enqueued(Ok(refused)))) => {
                    Ok(server::peers::RemoteEnqueued { refused })
                }
                Ok(Ok(Response::Enqueued(Err(e)))) => Err(format!("node '{home}': {e}")),
                Ok(Ok(other)) => Err(format!("node '{home}' answered {other:?}")),
                Ok(Err(e)) => Err(format!("node '{home}': {e}")),
                Err(_) => Err(format!("node '{home}': no answer")),
            }
        })
    }
}

/// Answers peers.
#[derive(Debug)]
pub(crate) struct Handler {
    pub(crate) node: std::sync::OnceLock<std::sync::Weak<ClusterNode>>,
    pub(crate) machine: MetaMachine,
    /// The broker, once started (queues homed here are reached through it).
    pub(crate) broker: std::sync::OnceLock<std::sync::Weak<server::broker::Broker>>,
    /// Itself (for the tasks it spawns).
    pub(crate) me: std::sync::OnceLock<std::sync::Weak<Handler>>,
    /// Peers' consumers of queues homed here.
    pub(crate) consumers: parking_lot::Mutex<PeerConsumers>,
    /// Deliveries peers took with `basic.get` and have not settled, by peer,
    /// vhost and queue: returned to their queues if the peer goes away.
    pub(crate) outstanding: parking_lot::Mutex<Outstanding>,
    /// Local remote consumers that took deliveries from a peer (by its id)
    /// in the read being handled: told when it ends (`end_of_burst`).
    pub(crate) in_burst: parking_lot::Mutex<InBurst>,
    /// The replicated queues' groups this node is a member of.
    pub(crate) queue_groups: Arc<crate::group_net::QueueGroups>,
}

/// Remote consumers by the peer whose read is being handled.
#[derive(Default)]
pub(crate) struct InBurst(Vec<(u64, Arc<dyn server::peers::RemoteSink>)>);

impl std::fmt::Debug for InBurst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InBurst")
            .field("sinks", &self.0.len())
            .finish()
    }
}

/// Unsettled deliveries by peer id, then by the id of their queue (not its
/// name: a queue deleted and declared again, or replaced by a replicated
/// one, is another queue, whose places are not these).
pub(crate) type Outstanding =
    std::collections::HashMap<u64, std::collections::HashMap<u64, PeerHeld>>;

/// What a peer holds of one queue here.
#[derive(Debug, Default)]
pub(crate) struct PeerHeld {
    vhost: String,
    queue: String,
    /// Places in the queue, with the consumer's count of unsettled
    /// deliveries (none for a `basic.get`).
    seqs: std::collections::BTreeMap<u64, Option<Arc<AtomicU32>>>,
}

impl Handler {
    /// Notes that peer `from` holds delivery `seq` of queue `queue_id`.
    fn note_held(
        &self,
        from: u64,
        queue_id: u64,
        (vhost, queue): (&str, &str),
        seq: u64,
        counter: Option<Arc<AtomicU32>>,
    ) {
        self.outstanding
            .lock()
            .entry(from)
            .or_default()
            .entry(queue_id)
            .or_insert_with(|| PeerHeld {
                vhost: vhost.to_owned(),
                queue: queue.to_owned(),
                seqs: Default::default(),
            })
            .seqs
            .insert(seq, counter);
    }
}

/// A peer's consumers here: (peer, key) -> (vhost, queue, tag on the queue).
pub(crate) type PeerConsumers =
    std::collections::HashMap<(u64, u64), (String, String, amqp_codec::ShortStr)>;

/// Most deliveries a peer's consumer without a prefetch may have unsettled.
const PEER_CONSUMER_WINDOW: u32 = 2048;

/// A peer's `queue.declare` placed here by `queue-leader-locator`:
/// declares the queue (committed for every node) or checks that the one
/// here is equivalent; answers its id and counts.
async fn declare_here(
    v: &Arc<server::vhost::Vhost>,
    queue: &str,
    durable: bool,
    auto_delete: bool,
    arguments: &[u8],
) -> Result<(u64, u32, u32), server::error::AmqpError> {
    use server::error::AmqpError;
    let name = amqp_codec::ShortStr::try_from(queue)
        .map_err(|e| AmqpError::precondition_failed(format!("queue name: {e}")))?;
    let (arguments, _) = amqp_codec::FieldTable::decode(&bytes::Bytes::copy_from_slice(arguments))
        .map_err(|e| AmqpError::precondition_failed(format!("arguments: {e:?}")))?;
    if v.find_queue(&name)
        .is_some_and(|q| q.exclusive_owner.is_some())
    {
        return Err(v.locked(&name));
    }
    v.declare_or_check_queue(name.clone(), durable, auto_delete, arguments)
        .await?;
    let q = v.find_queue(&name).ok_or_else(|| {
        AmqpError::not_found(format!("no queue '{name}' in vhost '{}'", v.name()))
    })?;
    let c = q.counters();
    Ok((
        q.id,
        u32::try_from(c.ready).unwrap_or(u32::MAX),
        u32::try_from(c.consumers).unwrap_or(u32::MAX),
    ))
}

fn wire_delivery(d: &server::peers::RemoteDelivery) -> crate::rpc::WireDelivery {
    crate::rpc::WireDelivery {
        seq: d.seq,
        redelivered: d.redelivered,
        delivery_count: d.delivery_count,
        remaining: d.remaining,
        exchange: d.exchange.to_string(),
        routing_key: d.routing_key.to_string(),
        header: d.header.clone(),
        body: d.body.clone(),
    }
}

/// A peer's consumer of a queue homed here: the queue delivers to it as to
/// a local channel, and each delivery goes over the link.
struct PeerSink {
    links: Arc<Links>,
    handler: std::sync::Weak<Handler>,
    peer: NodeInfo,
    key: u64,
    vhost: String,
    queue: String,
    /// The queue's id (what its held deliveries are noted under).
    queue_id: u64,
    unacked: Arc<AtomicU32>,
    prefetch: u16,
    /// Who consumes, on the peer.
    client: server::peers::RemoteClient,
}

impl std::fmt::Debug for PeerSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSink")
            .field("peer", &self.peer.name)
            .field("key", &self.key)
            .finish()
    }
}

impl server::queue::DeliverySink for PeerSink {
    fn can_deliver(&self) -> bool {
        self.links.is_connected(self.peer.id)
            && (self.prefetch > 0
                || self.unacked.load(std::sync::atomic::Ordering::Relaxed) < PEER_CONSUMER_WINDOW)
    }

    fn deliver(&self, out: server::queue::Outgoing<'_>) {
        let counter = out.consumer_unacked.cloned();
        if let Some(c) = &counter {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(h) = self.handler.upgrade() {
            h.note_held(
                self.peer.id,
                self.queue_id,
                (&self.vhost, &self.queue),
                out.seq,
                counter,
            );
        }
        let mut header = bytes::BytesMut::new();
        out.message.header.encode(&mut header);
        let d = server::peers::RemoteDelivery {
            seq: out.seq,
            redelivered: out.redelivered,
            delivery_count: out.delivery_count,
            remaining: 0,
            exchange: out.message.exchange.clone(),
            routing_key: out.message.routing_key.clone(),
            header: header.freeze(),
            body: out.message.body.clone(),
        };
        self.links.send_oneway(
            &self.peer.cluster_addr,
            Request::Deliver {
                key: self.key,
                vhost: self.vhost.clone(),
                queue: self.queue.clone(),
                delivery: wire_delivery(&d),
            },
        );
    }

    fn cancelled_by_broker(&self, _consumer_tag: &amqp_codec::ShortStr) {
        if let Some(h) = self.handler.upgrade() {
            h.consumers.lock().remove(&(self.peer.id, self.key));
        }
        self.links.send_oneway(
            &self.peer.cluster_addr,
            Request::ConsumerCancelled { key: self.key },
        );
    }

    fn describe(&self) -> server::queue::SinkInfo {
        let c = &self.client;
        server::queue::SinkInfo {
            tag: Some(c.tag.clone()),
            connection_name: c.connection_name.clone(),
            channel: c.channel,
            peer: c
                .peer
                .parse()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
            user: c.user.clone(),
        }
    }
}

fn settle_from_octet(how: u8) -> server::queue::Settle {
    match how {
        0 => server::queue::Settle::Ack,
        1 => server::queue::Settle::Requeue,
        _ => server::queue::Settle::Reject,
    }
}

fn settle_octet(how: server::queue::Settle) -> u8 {
    match how {
        server::queue::Settle::Ack => 0,
        server::queue::Settle::Requeue => 1,
        server::queue::Settle::Reject => 2,
    }
}

/// Decodes a peer's enqueue for the server.
fn remote_publish(e: crate::rpc::EnqueueRequest) -> Result<server::peers::RemotePublish, String> {
    let short = |s: String, what: &str| {
        amqp_codec::ShortStr::try_from(s.as_str()).map_err(|e| format!("{what}: {e}"))
    };
    Ok(server::peers::RemotePublish {
        vhost: e.vhost,
        queue: short(e.queue, "queue")?,
        exchange: short(e.exchange, "exchange")?,
        routing_key: short(e.routing_key, "routing key")?,
        header: e.header,
        body: e.body,
    })
}

impl Handler {
    fn broker(&self) -> Option<Arc<server::broker::Broker>> {
        self.broker.get().and_then(std::sync::Weak::upgrade)
    }

    /// `basic.get` for a peer.
    fn get(
        &self,
        from: u64,
        vhost: String,
        queue: String,
        ack: bool,
    ) -> Pin<Box<dyn std::future::Future<Output = Response> + Send>> {
        let broker = self.broker();
        let outstanding = self.outstanding_handle();
        Box::pin(async move {
            let Some(v) = broker.and_then(|b| b.vhost(&vhost)) else {
                return Response::Got(Err(format!("no vhost '{vhost}' on this node")));
            };
            // (By id; 0, by name, if the queue is gone meanwhile.)
            let queue_id = v.find_queue(&queue).map_or(0, |q| q.id);
            match v.get_from_peer(&queue, ack).await {
                Ok(Some(d)) => {
                    if ack {
                        if let Some(o) = outstanding.upgrade() {
                            o.note_held(from, queue_id, (&vhost, &queue), d.seq, None);
                        }
                    }
                    Response::Got(Ok(Some(wire_delivery(&d))))
                }
                Ok(None) => Response::Got(Ok(None)),
                Err(e) => Response::Got(Err(e)),
            }
        })
    }

    /// Settles a peer's deliveries, now (in the link's order).
    fn settle(
        &self,
        from: u64,
        vhost: String,
        queue: String,
        queue_id: u64,
        seqs: Vec<u64>,
        how: u8,
    ) -> Response {
        {
            let mut o = self.outstanding.lock();
            if let Some(by_queue) = o.get_mut(&from) {
                // (A settle by name, id 0, from an older peer: whichever
                // queue of that name it holds deliveries of.)
                let held = match queue_id {
                    0 => by_queue
                        .values_mut()
                        .find(|h| h.vhost == vhost && h.queue == queue),
                    id => by_queue.get_mut(&id),
                };
                if let Some(held) = held {
                    for s in &seqs {
                        if let Some(Some(counter)) = held.seqs.remove(s) {
                            counter.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        if let Some(v) = self.broker().and_then(|b| b.vhost(&vhost)) {
            v.settle_from_peer(&queue, queue_id, &seqs, settle_from_octet(how));
        }
        Response::Settled
    }

    /// Starts a peer's consumer on a queue homed here.
    #[allow(clippy::too_many_arguments)]
    fn consume(
        &self,
        from: &NodeInfo,
        vhost: String,
        queue: String,
        key: u64,
        prefetch: u16,
        exclusive: bool,
        priority: i32,
        client: server::peers::RemoteClient,
    ) -> Response {
        let Some(links) = self.node().map(|n| n.links.clone()) else {
            return Response::Consumed(Err("the node is starting or stopping".into()));
        };
        let Some(v) = self.broker().and_then(|b| b.vhost(&vhost)) else {
            return Response::Consumed(Err(format!("no vhost '{vhost}' on this node")));
        };
        let Some(q) = v.find_queue(&queue) else {
            return Response::Consumed(Err(format!(
                "no queue '{queue}' in vhost '{vhost}' on this node"
            )));
        };
        let Ok(tag) = amqp_codec::ShortStr::try_from(format!("peer.{}.{key}", from.id).as_str())
        else {
            return Response::Consumed(Err("consumer tag".into()));
        };
        let unacked = Arc::new(AtomicU32::new(0));
        let sink = Arc::new(PeerSink {
            links,
            handler: self.outstanding_handle(),
            peer: from.clone(),
            key,
            vhost: vhost.clone(),
            queue: queue.clone(),
            queue_id: q.id,
            unacked: unacked.clone(),
            prefetch,
            client,
        });
        let consumer = server::queue::Consumer {
            tag: tag.clone(),
            sink,
            no_ack: false,
            prefetch,
            unacked,
            exclusive,
            priority,
        };
        match q.kind().consume(consumer, &mut || {}) {
            Ok(()) => {}
            Err(server::queue::ConsumeRefused::Deleted) => {
                return Response::Consumed(Err(format!("no queue '{queue}' in vhost '{vhost}'")));
            }
            Err(server::queue::ConsumeRefused::InExclusiveUse) => {
                return Response::Consumed(Err(format!(
                    "queue '{queue}' in vhost '{vhost}' in exclusive use"
                )));
            }
        }
        self.consumers
            .lock()
            .insert((from.id, key), (vhost, queue, tag));
        v.dispatch(&q);
        Response::Consumed(Ok(()))
    }

    /// Cancels a peer's consumer.
    fn cancel(&self, from: u64, key: u64) {
        let Some((vhost, queue, tag)) = self.consumers.lock().remove(&(from, key)) else {
            return;
        };
        if let Some(v) = self.broker().and_then(|b| b.vhost(&vhost)) {
            if let Some(q) = v.find_queue(&queue) {
                v.cancel_consumer(&q, &tag);
            }
        }
    }

    fn outstanding_handle(&self) -> std::sync::Weak<Handler> {
        self.me.get().cloned().unwrap_or_default()
    }

    /// Enqueues into a local queue now (in the link's order); the future
    /// answers once it is durable.
    fn enqueue(
        &self,
        e: crate::rpc::EnqueueRequest,
    ) -> Pin<Box<dyn std::future::Future<Output = Response> + Send>> {
        let now = move || -> Result<_, String> {
            let broker = self
                .broker
                .get()
                .and_then(std::sync::Weak::upgrade)
                .ok_or("the broker is not running on this node")?;
            let vhost = broker
                .vhost(&e.vhost)
                .ok_or_else(|| format!("no vhost '{}' on this node", e.vhost))?;
            vhost.enqueue_from_peer(remote_publish(e)?)
        };
        match now() {
            Err(text) => Box::pin(std::future::ready(Response::Enqueued(Err(text)))),
            Ok(done) => Box::pin(async move {
                if let Some(forwarded) = done.forwarded {
                    return Response::Enqueued(forwarded.await.map(|e| e.refused));
                }
                if let Some(commit) = done.commit {
                    if let Err(e) = commit.await {
                        return Response::Enqueued(Err(format!("store: {e}")));
                    }
                }
                for gate in &done.congested {
                    gate.wait_lowered().await;
                }
                Response::Enqueued(Ok(done.refused))
            }),
        }
    }
}

impl Handler {
    fn node(&self) -> Option<Arc<ClusterNode>> {
        self.node.get().and_then(std::sync::Weak::upgrade)
    }
}

impl RequestHandler for Handler {
    fn peer_gone(&self, id: u64) {
        // Its consumers here go; so do this node's consumers of queues homed
        // there (their clients are told, as when a queue's node goes down).
        let theirs: Vec<u64> = self
            .consumers
            .lock()
            .keys()
            .filter(|(peer, _)| *peer == id)
            .map(|(_, key)| *key)
            .collect();
        for key in theirs {
            self.cancel(id, key);
        }
        if let Some(node) = self.node() {
            node.replicas.node_gone(id);
            let name = node.name_of(id);
            let ours: Vec<Arc<dyn server::peers::RemoteSink>> = {
                let mut sinks = node.sinks.lock();
                let keys: Vec<u64> = sinks
                    .iter()
                    .filter(|(_, (home, _))| Some(home) == name.as_ref())
                    .map(|(k, _)| *k)
                    .collect();
                keys.into_iter()
                    .filter_map(|k| sinks.remove(&k).map(|(_, s)| s))
                    .collect()
            };
            for sink in ours {
                sink.cancelled();
            }
        }
        let Some(by_queue) = self.outstanding.lock().remove(&id) else {
            return;
        };
        let Some(broker) = self.broker() else {
            return;
        };
        for (queue_id, held) in by_queue {
            let PeerHeld { vhost, queue, seqs } = held;
            if seqs.is_empty() {
                continue;
            }
            tracing::info!(peer = id, %vhost, %queue, messages = seqs.len(), "a node went away: returning its unsettled deliveries to the queue");
            if let Some(v) = broker.vhost(&vhost) {
                let seqs: Vec<u64> = seqs.into_keys().collect();
                v.settle_from_peer(&queue, queue_id, &seqs, server::queue::Settle::Requeue);
            }
        }
    }

    fn end_of_burst(&self, from: &NodeInfo) {
        let ended: Vec<Arc<dyn server::peers::RemoteSink>> = {
            let burst = &mut self.in_burst.lock().0;
            if burst.is_empty() {
                return;
            }
            let mut ended = Vec::new();
            burst.retain(|(id, sink)| {
                if *id == from.id {
                    ended.push(sink.clone());
                }
                *id != from.id
            });
            ended
        };
        for sink in ended {
            sink.end_of_burst();
        }
    }

    fn admits(&self, id: u64) -> Result<(), String> {
        match self.machine.forgotten(id) {
            Some(name) => Err(format!(
                "node '{name}' ({id}) was removed from the cluster (forget_cluster_node); reset its data directory to join again as a new node"
            )),
            None => Ok(()),
        }
    }

    fn handle(
        &self,
        from: NodeInfo,
        request: Request,
    ) -> Pin<Box<dyn std::future::Future<Output = Response> + Send>> {
        let request = match request {
            Request::Enqueue(e) => return self.enqueue(e),
            Request::Get { vhost, queue, ack } => return self.get(from.id, vhost, queue, ack),
            Request::List(what) => {
                let listing = match self.broker() {
                    Some(b) => serde_json::to_string(&server::management::local_listing(&b, what))
                        .map_err(|e| e.to_string()),
                    None => Err("the broker is not running on this node".to_owned()),
                };
                return Box::pin(std::future::ready(Response::Listing(listing)));
            }
            Request::CloseConnection { name, reason } => {
                let closed = self.broker().is_some_and(|b| {
                    server::management::close_local_connection(&b, &name, &reason)
                });
                return Box::pin(std::future::ready(Response::ConnectionClosed(closed)));
            }
            Request::Purge { vhost, queue } => {
                let v = self.broker().and_then(|b| b.vhost(&vhost));
                let done = match v.as_ref().and_then(|v| Some((v, v.find_queue(&queue)?))) {
                    Some((v, q)) => Ok(u32::try_from(v.purge(&q)).unwrap_or(u32::MAX)),
                    None => Err((404, format!("no queue '{queue}' in vhost '{vhost}'"))),
                };
                return Box::pin(std::future::ready(Response::Count(done)));
            }
            Request::DeleteQueue {
                vhost,
                queue,
                if_unused,
                if_empty,
            } => {
                let v = self.broker().and_then(|b| b.vhost(&vhost));
                return Box::pin(async move {
                    // Gone already: deleting it is done (as for a local one).
                    let Some((v, q)) = v.as_ref().and_then(|v| Some((v, v.find_queue(&queue)?)))
                    else {
                        return Response::Count(Ok(0));
                    };
                    let done = v
                        .delete_queue_if(&q, if_unused, if_empty)
                        .await
                        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
                        .map_err(|e| (e.code, e.text));
                    Response::Count(done)
                });
            }
            Request::DeclareQueue {
                vhost,
                queue,
                durable,
                auto_delete,
                arguments,
            } => {
                let v = self.broker().and_then(|b| b.vhost(&vhost));
                return Box::pin(async move {
                    let Some(v) = v else {
                        return Response::Declared(Err((
                            404,
                            format!("no vhost '{vhost}' on this node"),
                        )));
                    };
                    let declared = declare_here(&v, &queue, durable, auto_delete, &arguments).await;
                    Response::Declared(declared.map_err(|e| (e.code, e.text)))
                });
            }
            Request::QueueInfo { vhost, queue } => {
                let counts = self
                    .broker()
                    .and_then(|b| b.vhost(&vhost))
                    .and_then(|v| v.find_queue(&queue))
                    .map(|q| {
                        let c = q.counters();
                        (
                            u32::try_from(c.ready).unwrap_or(u32::MAX),
                            u32::try_from(c.consumers).unwrap_or(u32::MAX),
                        )
                    });
                return Box::pin(std::future::ready(Response::QueueInfo(counts)));
            }
            Request::Settle {
                vhost,
                queue,
                queue_id,
                seqs,
                how,
            } => {
                let done = self.settle(from.id, vhost, queue, queue_id, seqs, how);
                return Box::pin(std::future::ready(done));
            }
            Request::Consume {
                vhost,
                queue,
                key,
                prefetch,
                exclusive,
                priority,
                client,
            } => {
                let done = self.consume(
                    &from, vhost, queue, key, prefetch, exclusive, priority, client,
                );
                return Box::pin(std::future::ready(done));
            }
            Request::Cancel { key } => {
                self.cancel(from.id, key);
                return Box::pin(std::future::ready(Response::Settled));
            }
            Request::Deliver {
                key,
                vhost,
                queue,
                delivery,
            } => {
                let seq = delivery.seq;
                let sink = self
                    .node()
                    .and_then(|n| n.sinks.lock().get(&key).map(|(_, s)| s.clone()));
                match (sink, crate::replica::remote_delivery(delivery)) {
                    (Some(sink), Ok(d)) => {
                        sink.deliver(d);
                        let burst = &mut self.in_burst.lock().0;
                        if !burst
                            .iter()
                            .any(|(id, s)| *id == from.id && Arc::ptr_eq(s, &sink))
                        {
                            burst.push((from.id, sink));
                        }
                    }
                    (None, Ok(_)) => {
                        // The consumer is gone here: back to the queue.
                        tracing::debug!(key, "a delivery for a consumer that is gone: requeued");
                        if let Some(n) = self.node() {
                            n.links.send_oneway(
                                &from.cluster_addr,
                                Request::Settle {
                                    vhost,
                                    queue,
                                    queue_id: 0,
                                    seqs: vec![seq],
                                    how: settle_octet(server::queue::Settle::Requeue),
                                },
                            );
                        }
                    }
                    (_, Err(e)) => {
                        tracing::warn!(error = %e, "an undecodable delivery from node {}", from.name)
                    }
                }
                return Box::pin(std::future::ready(Response::Settled));
            }
            Request::QueuePropose { group, request } => {
                let Some(node) = self.node() else {
                    return Box::pin(std::future::ready(Response::Unavailable(
                        "the node is starting or stopping".into(),
                    )));
                };
                return node.replicas.serve_propose(group, request);
            }
            Request::QueueDeliver {
                group,
                key,
                delivery,
            } => {
                if let Some(node) = self.node() {
                    if let Some(sink) = node.replicas.deliver_here(group, key, delivery) {
                        let burst = &mut self.in_burst.lock().0;
                        if !burst
                            .iter()
                            .any(|(id, s)| *id == from.id && Arc::ptr_eq(s, &sink))
                        {
                            burst.push((from.id, sink));
                        }
                    }
                }
                return Box::pin(std::future::ready(Response::Settled));
            }
            Request::QueueMembers { group, node, add } => {
                let Some(n) = self.node() else {
                    return Box::pin(std::future::ready(Response::Unavailable(
                        "the node is starting or stopping".into(),
                    )));
                };
                return Box::pin(async move { n.replicas.change_voters(group, node, add).await });
            }
            Request::QueueFailover { group } => {
                if let Some(node) = self.node() {
                    node.replicas.failed_over(group);
                }
                return Box::pin(std::future::ready(Response::Settled));
            }
            Request::QueueStatus { group } => {
                let status = self
                    .node()
                    .and_then(|n| n.replicas.get(group)?.local_status(&n.replicas));
                return Box::pin(std::future::ready(Response::ReplicaStatus(status)));
            }
            Request::QueueRaftStatus { group } => {
                let row = self
                    .node()
                    .and_then(|n| n.replicas.get(group)?.raft_member(&n.replicas));
                return Box::pin(std::future::ready(Response::QueueRaftStatus(row)));
            }
            Request::ConsumerCancelled { key } => {
                let sink = self.node().and_then(|n| n.sinks.lock().remove(&key));
                if let Some((_, sink)) = sink {
                    sink.cancelled();
                }
                return Box::pin(std::future::ready(Response::Settled));
            }
            other => other,
        };
        let node = self.node();
        let groups = self.queue_groups.clone();
        Box::pin(async move {
            let Some(node) = node else {
                return Response::Unavailable("the node is starting or stopping".into());
            };
            match request {
                Request::Append { group, rpc } if group == META_GROUP => {
                    Response::Append(node.raft.append_entries(rpc).await)
                }
                Request::Vote { group, rpc } if group == META_GROUP => {
                    Response::Vote(node.raft.vote(rpc).await)
                }
                Request::Snapshot { group, rpc } if group == META_GROUP => {
                    Response::Snapshot(node.raft.install_snapshot(rpc).await)
                }
                Request::Elect { group } if group == META_GROUP => {
                    match node.raft.trigger().elect().await {
                        Ok(()) => Response::Settled,
                        Err(e) => Response::Unavailable(e.to_string()),
                    }
                }
                request @ (Request::Vote { .. }
                | Request::Elect { .. }
                | Request::QueueAppend { .. }
                | Request::QueueSnapshot { .. }) => match groups.serve(request).await {
                    Ok(response) => response,
                    Err(_) => Response::NoSuchGroup(u64::MAX),
                },
                Request::Append { group, .. } | Request::Snapshot { group, .. } => {
                    Response::NoSuchGroup(group)
                }
                Request::Commit(req) => {
                    if !node.is_leader() {
                        return Response::NotLeader(node.leader());
                    }
                    match node.write_as_leader(req).await {
                        Ok((outcome, index)) => Response::Committed { outcome, index },
                        Err(e) => Response::Unavailable(e.to_string()),
                    }
                }
                Request::Join(info) => {
                    if info.id != from.id {
                        return Response::Joined(Err(
                            "a node may only ask to join for itself".into()
                        ));
                    }
                    if !node.is_leader() {
                        return Response::NotLeader(node.leader());
                    }
                    Response::Joined(node.add_member(info).await)
                }
                Request::Status => Response::Status(node.status()),
                Request::Forget { name } => {
                    if !node.is_leader() {
                        return Response::NotLeader(node.leader());
                    }
                    Response::Forgotten(node.forget(&name).await.map_err(|e| match e {
                        MetaError::NotFound(t) => format!("NotFound: {t}"),
                        other => other.to_string(),
                    }))
                }
                Request::Enqueue(_)
                | Request::List(_)
                | Request::CloseConnection { .. }
                | Request::Purge { .. }
                | Request::DeleteQueue { .. }
                | Request::QueueInfo { .. }
                | Request::DeclareQueue { .. }
                | Request::Get { .. }
                | Request::Settle { .. }
                | Request::Consume { .. }
                | Request::Cancel { .. }
                | Request::Deliver { .. }
                | Request::QueuePropose { .. }
                | Request::QueueDeliver { .. }
                | Request::QueueStatus { .. }
                | Request::QueueRaftStatus { .. }
                | Request::QueueFailover { .. }
                | Request::QueueMembers { .. }
                | Request::ConsumerCancelled { .. } => {
                    Response::Unavailable("handled above".into())
                }
            }
        })
    }
}
