//! [`Vhost`]: one virtual host's routing table and queues, and every
//! operation that changes them (declare, bind, delete, settle), including
//! committing durable definitions (as `crate::meta` commands) before the
//! client is told they exist.
//!
//! A vhost's exchanges, queues and bindings change through these methods
//! (AMQP methods, the management API and definitions import call them; boot
//! recovery calls the `recover_*` ones with the recovered commands). The
//! router here validates against everything, transient objects included,
//! and the durable part is then committed through the broker's `MetaLog`.

use std::sync::Arc;
use std::time::Duration;

use amqp_codec::{FieldTable, FieldValue, ShortStr};
use dashmap::DashMap;
use exchange::{BindingDef, Destination, ExchangeDeclare, ExchangeDef, QueueId, Removed, Router};
use parking_lot::RwLock;
use queue_store::{
    DeadLetterRequest, Effects, Message, MessageId, MessageRef, Queue, QueueArgs,
    dead_letter::is_cycle,
};

use crate::error::AmqpError;
use crate::meta::{MetaCommand, QueueDef};
use crate::node::Node;
use crate::policy::PolicyKind;
use crate::queue::{AppliedPolicies, QueueHandle, Settle, Unacked, notify_cancel, now_ms};
use crate::rates::SampledRates;

mod mirroring;

/// How long `declare-ok` of a new replicated queue waits for its group to
/// elect a leader (and commit its arguments) before it goes anyway.
const DECLARE_WAITS_FOR_LEADER: Duration = Duration::from_secs(10);

/// A message to publish (see [`Vhost::enqueue`]).
#[derive(Debug)]
pub struct Publish<'a> {
    /// Exchange name (empty: the default exchange).
    pub exchange: &'a ShortStr,
    /// Routing key.
    pub routing_key: &'a ShortStr,
    /// Return it if unroutable (counted as returned rather than dropped).
    pub mandatory: bool,
    /// Content header.
    pub header: amqp_codec::ContentHeader,
    /// Its `headers` property, decoded (headers exchanges, CC/BCC).
    pub headers: Option<FieldTable>,
    /// Body.
    pub body: bytes::Bytes,
    /// Who publishes it (for the firehose).
    pub publisher: crate::trace::Party<'a>,
}

/// What a queue here did with a message another node sent it.
pub struct PeerEnqueue {
    /// Refused (`x-overflow` reject-publish).
    pub refused: bool,
    /// The store commit to wait for before answering (a persistent message).
    pub commit: Option<StoreCommit>,
    /// Gates (the queue's, the store's) raised by it: the answer waits until
    /// they are lowered.
    pub congested: Vec<Arc<queue_store::FlowGate>>,
    /// Sent on to the replicated queue that took over the classic queue it
    /// was sent to: its answer is the answer.
    pub forwarded: Option<crate::peers::RemoteOutcome>,
}

impl std::fmt::Debug for PeerEnqueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerEnqueue")
            .field("refused", &self.refused)
            .field("commit", &self.commit.is_some())
            .field("congested", &self.congested.len())
            .field("forwarded", &self.forwarded.is_some())
            .finish()
    }
}

/// What publishing one message did.
#[derive(Debug)]
pub struct Enqueue {
    /// The message as queued.
    pub message: Arc<Message>,
    /// A queue refused it (`x-overflow` reject-publish): nack it.
    pub refused: bool,
    /// It was written to the store: a confirm waits for the commit.
    pub wrote: bool,
    /// No queue took it.
    pub unroutable: bool,
    /// Flow gates found raised: the publisher should pause.
    pub congested: Vec<Arc<queue_store::FlowGate>>,
    /// Enqueues into queues on other nodes, sent; a confirm waits for them.
    pub remote: Vec<crate::peers::Pending>,
}

/// A store commit to wait for.
pub type StoreCommit = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), queue_store::StoreError>> + Send + 'static>,
>;

/// A virtual host.
#[derive(Debug)]
pub struct Vhost {
    name: ShortStr,
    /// Exchanges and bindings.
    pub router: RwLock<Router>,
    queues: DashMap<ShortStr, Arc<QueueHandle>>,
    /// (FxHash: looked up for every routed message; ids are ours, not a peer's.)
    by_id: DashMap<u64, Arc<QueueHandle>, rustc_hash::FxBuildHasher>,
    /// Queues that live on other nodes of the cluster, by name; the router
    /// knows them by their ids.
    remote: DashMap<ShortStr, crate::peers::RemoteQueue>,
    /// The same, by id.
    remote_ids: DashMap<u64, ShortStr>,
    /// Classic queues of this node that a mirroring policy turned into
    /// replicated ones, by name, while their messages move into the group
    /// (see `mirroring`): no longer routed to or listed, still settled.
    moving: DashMap<ShortStr, Arc<QueueHandle>>,
    /// Other nodes' classic queues that became replicated, by their old
    /// ids: deliveries taken from them before are still settled there.
    moved: DashMap<u64, crate::peers::RemoteQueue>,
    /// Classic queues of this node whose takeover is being committed.
    converting: dashmap::DashSet<ShortStr>,
    /// Cancelled when the vhost is deleted: its connections close.
    pub closed: tokio_util::sync::CancellationToken,
    /// Open connections to this vhost.
    pub connections: std::sync::atomic::AtomicUsize,
    /// Per-vhost limits (RabbitMQ's `max-connections`, `max-queues`).
    pub limits: parking_lot::Mutex<VhostLimits>,
    /// Policies of this vhost.
    pub policies: RwLock<Vec<crate::policy::Policy>>,
    /// Operator policies of this vhost (lock order: `policies` first).
    pub operator_policies: RwLock<Vec<crate::policy::Policy>>,
    /// Its exchanges' publish rates (of the router's counts: RabbitMQ's
    /// `publish_in` and `publish_out`), by name, sampled every 5 s.
    exchange_rates: parking_lot::Mutex<std::collections::HashMap<String, SampledRates<2>>>,
    /// The firehose switch and its pending copies (shared with the queues).
    pub tracer: Arc<crate::trace::Tracer>,
    /// What it shares with the node's other vhosts (store, metadata log,
    /// metrics, settings, tasks).
    node: Arc<Node>,
    /// Itself, for the tasks it spawns (queue housekeeping, auto-delete).
    me: std::sync::Weak<Vhost>,
    /// Dead letters that wait for earlier ones whose bodies are paged out,
    /// in batches, for the task that publishes them in order (started on
    /// first use).
    dead_letters_later: parking_lot::Mutex<Option<DeadLetterQueue>>,
    /// Batches handed to that task and not yet published.
    dead_letters_behind: std::sync::atomic::AtomicUsize,
}

/// Where dead letters go to be published after the paged ones before them.
type DeadLetterQueue = tokio::sync::mpsc::UnboundedSender<Vec<DeadLetterRequest>>;

pub use crate::meta::VhostLimits;

impl Vhost {
    /// An empty vhost with the system exchanges.
    pub fn new(name: ShortStr, node: Arc<Node>) -> Arc<Vhost> {
        let tracer = Arc::new(crate::trace::Tracer::new(&node.config.node_name));
        Arc::new_cyclic(|me| Vhost {
            node,
            me: me.clone(),
            router: RwLock::new(Router::new(name.clone())),
            name,
            queues: DashMap::new(),
            by_id: DashMap::default(),
            remote: DashMap::new(),
            remote_ids: DashMap::new(),
            moving: DashMap::new(),
            moved: DashMap::new(),
            converting: dashmap::DashSet::new(),
            closed: tokio_util::sync::CancellationToken::new(),
            connections: std::sync::atomic::AtomicUsize::new(0),
            limits: parking_lot::Mutex::new(VhostLimits::default()),
            policies: RwLock::new(Vec::new()),
            operator_policies: RwLock::new(Vec::new()),
            exchange_rates: Default::default(),
            tracer,
            dead_letters_later: parking_lot::Mutex::new(None),
            dead_letters_behind: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Samples its exchanges' counts for their rates (the monitor, every
    /// 5 s); deleted exchanges' rates go.
    pub fn sample_exchange_rates(&self) {
        let traffic: Vec<(String, [u64; 2])> = self
            .router
            .read()
            .all_traffic()
            .map(|(name, t)| (name.to_owned(), t))
            .collect();
        let mut rates = self.exchange_rates.lock();
        let mut before = std::mem::take(&mut *rates);
        for (name, t) in traffic {
            let r = before.remove(&name).unwrap_or_default();
            r.sample(t);
            rates.insert(name, r);
        }
    }

    /// The publish rates of exchange `name` (`""`: the default exchange) at
    /// the last sample: published to it, copies it routed.
    pub fn exchange_rates(&self, name: &str) -> [f64; 2] {
        self.exchange_rates
            .lock()
            .get(name)
            .map_or([0.0; 2], SampledRates::rates)
    }

    /// The policies of `kind`.
    pub fn policies_of(&self, kind: PolicyKind) -> &RwLock<Vec<crate::policy::Policy>> {
        match kind {
            PolicyKind::User => &self.policies,
            PolicyKind::Operator => &self.operator_policies,
        }
    }

    /// The arguments in effect for queue `name`, declared with `arguments`:
    /// its own merged with the policy and the operator policy that apply to
    /// it, if any, and which those are. (The caller holds the policies.)
    fn effective_args(
        &self,
        policies: &[crate::policy::Policy],
        operator_policies: &[crate::policy::Policy],
        name: &ShortStr,
        arguments: &FieldTable,
    ) -> (QueueArgs, AppliedPolicies) {
        let policy = crate::policy::for_queue(policies, name);
        let operator = crate::policy::for_queue(operator_policies, name);
        let applied = AppliedPolicies {
            policy: policy.map(|p| p.name.clone()),
            operator_policy: operator.map(|p| p.name.clone()),
            definition: crate::policy::effective(policy, operator),
        };
        let own = || QueueArgs::parse(arguments, name, &self.name).unwrap_or_default();
        if applied.definition.is_empty() {
            return (own(), AppliedPolicies::default());
        }
        let merged = crate::policy::merge_into(&applied.definition, arguments);
        match QueueArgs::parse(&merged, name, &self.name) {
            Ok(args) => (args, applied),
            Err(e) => {
                tracing::warn!(queue = %name, error = %e, "policy not applicable; the queue's own arguments apply");
                (own(), AppliedPolicies::default())
            }
        }
    }

    /// Puts the arguments in effect for `q` (see [`Self::effective_args`])
    /// and records which policies those come from.
    pub fn apply_policy(&self, q: &QueueHandle) {
        let mut fx = Effects::default();
        {
            // Policies are held until the queue has its arguments, so that
            // two policy changes cannot apply out of order (lock order:
            // policies, operator policies, then the queue's state).
            let policies = self.policies.read();
            let operator_policies = self.operator_policies.read();
            let (args, applied) =
                self.effective_args(&policies, &operator_policies, &q.name, &q.arguments);
            q.set_consumer_timeout(args.consumer_timeout);
            if !q.set_effective_args(args, &mut fx) {
                return;
            }
            *q.policy.lock() = applied;
        }
        q.wake.notify_one();
        self.apply(&mut fx);
    }

    /// Proposes the arguments in effect to replicated queue `remote`, if
    /// this node holds one of its replicas (each member proposes them, so
    /// that one node down does not keep a policy from it; the same
    /// arguments twice change nothing). Its log orders them with its
    /// messages, so every replica applies them at the same point.
    pub fn apply_policy_to_replicated(&self, remote: &crate::peers::RemoteQueue) {
        let me = &self.node.config.node_name;
        if !remote.members.iter().any(|m| m == me) {
            return;
        }
        let Some(peers) = self.node.peers.get() else {
            return;
        };
        let args = self.replicated_args(remote).0;
        peers.set_replica_args(&self.name, &remote.name, args);
    }

    /// The arguments in effect for replicated queue `remote` (its own
    /// merged with the policies that apply), and those policies.
    fn replicated_args(&self, remote: &crate::peers::RemoteQueue) -> (QueueArgs, AppliedPolicies) {
        let policies = self.policies.read();
        let operator_policies = self.operator_policies.read();
        self.effective_args(
            &policies,
            &operator_policies,
            &remote.name,
            &remote.arguments,
        )
    }

    /// The policies that apply to replicated queue `remote` and the
    /// definition they give (for listings: each member holds the same).
    pub fn policies_of_replicated(&self, remote: &crate::peers::RemoteQueue) -> AppliedPolicies {
        self.replicated_args(remote).1
    }

    /// Re-applies policies to every replicated queue (a policy changed).
    pub fn apply_policies_to_replicated(&self) {
        for remote in self.remote_queues() {
            if remote.replicated() {
                self.apply_policy_to_replicated(&remote);
            }
        }
    }

    /// Re-applies policies to every queue and exchange (a policy changed).
    pub fn apply_policies(&self) {
        for q in self.queues() {
            self.apply_policy(&q);
        }
        self.apply_exchange_policies();
    }

    /// Gives every exchange the alternate exchange of the policy that applies
    /// to it (its own `alternate-exchange` argument wins).
    pub fn apply_exchange_policies(&self) {
        let policies = self.policies.read();
        let mut router = self.router.write();
        let names: Vec<ShortStr> = router.exchanges().map(|x| x.name.clone()).collect();
        for name in names {
            let ae = crate::policy::for_exchange(&policies, &name)
                .and_then(crate::policy::Policy::alternate_exchange);
            router.set_policy_alternate(&name, ae);
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every queue.
    pub fn queues(&self) -> Vec<Arc<QueueHandle>> {
        self.queues.iter().map(|q| q.value().clone()).collect()
    }

    /// The queue called `name`, whoever owns it.
    pub fn find_queue(&self, name: &str) -> Option<Arc<QueueHandle>> {
        self.queues.get(name).map(|q| q.value().clone())
    }

    /// The queue with storage id `id`.
    pub fn queue_by_id(&self, id: u64) -> Option<Arc<QueueHandle>> {
        self.by_id.get(&id).map(|q| q.value().clone())
    }

    /// The queue called `name` on another node, if the metadata has one.
    pub fn find_remote_queue(&self, name: &str) -> Option<crate::peers::RemoteQueue> {
        self.remote.get(name).map(|q| q.value().clone())
    }

    /// The queue called `name` on another node, for anything but
    /// publishing: another connection's exclusive queue is off limits
    /// (405, as a local one).
    pub fn usable_remote_queue(
        &self,
        name: &str,
    ) -> Result<Option<crate::peers::RemoteQueue>, AmqpError> {
        match self.find_remote_queue(name) {
            Some(q) if q.exclusive => Err(self.locked(&q.name)),
            found => Ok(found),
        }
    }

    /// Every queue on other nodes.
    pub fn remote_queues(&self) -> Vec<crate::peers::RemoteQueue> {
        self.remote.iter().map(|q| q.value().clone()).collect()
    }

    /// Projects a queue's declaration made on another node: one homed
    /// elsewhere becomes routable here by name.
    pub fn project_queue(&self, def: &QueueDef) {
        let Some(home) = def.home.clone() else {
            return;
        };
        // A classic queue it took over moves in once the name reaches it
        // (below).
        let moving = def.replaces.and_then(|old| self.take_over(def, old));
        self.project_new_queue(def, home);
        if let Some(q) = moving {
            self.start_move(q, def.id);
        }
    }

    /// [`Self::project_queue`] of a queue new to this node's view.
    fn project_new_queue(&self, def: &QueueDef, home: String) {
        let replicated = !def.members.is_empty();
        if replicated && self.node.is_home(&def.home) {
            self.node.note_queue_id(def.id);
        }
        if self.node.is_home(&def.home) && !replicated {
            // Declared here; or, if transient, by an earlier run whose ids
            // the new ones must stay above.
            self.node.note_queue_id(def.id);
            return;
        }
        if let Some(mut known) = self.remote.get_mut(&def.name) {
            // A replicated queue's members may have changed.
            if known.id == def.id && known.members != def.members {
                known.members = def.members.clone();
            }
            return;
        }
        self.router
            .write()
            .add_queue(def.name.clone(), QueueId(def.id));
        self.remote_ids.insert(def.id, def.name.clone());
        self.remote.insert(
            def.name.clone(),
            crate::peers::RemoteQueue {
                id: def.id,
                name: def.name.clone(),
                home,
                durable: def.durable,
                exclusive: def.exclusive,
                auto_delete: def.auto_delete,
                arguments: Arc::new(def.arguments.clone()),
                members: def.members.clone(),
            },
        );
    }

    /// Declares a replicated (quorum) queue in a cluster, on `members` (the
    /// first one starts its group and leads it first). Committed for every
    /// node; every node, its members too, reaches it through the cluster
    /// (as a [`RemoteQueue`](crate::peers::RemoteQueue)).
    pub async fn declare_replicated(
        &self,
        name: ShortStr,
        arguments: FieldTable,
        members: Vec<String>,
    ) -> Result<crate::peers::RemoteQueue, AmqpError> {
        if let Some(max) = self.limits.lock().max_queues {
            if self.queues.len() + self.remote.len() >= max {
                return Err(AmqpError::precondition_failed(format!(
                    "cannot declare queue '{name}': queue limit in vhost '{}' ({max}) is reached",
                    self.name
                )));
            }
        }
        let id = self.node.next_queue_id();
        self.node
            .meta
            .commit(MetaCommand::DeclareQueue {
                vhost: self.name.to_string(),
                queue: QueueDef {
                    name: name.clone(),
                    id,
                    durable: true,
                    exclusive: false,
                    auto_delete: false,
                    arguments,
                    home: members.first().cloned(),
                    members,
                    replaces: None,
                },
            })
            .await?;
        self.node.metrics.queues_created.inc();
        // Projected by the commit (another node may have declared it first).
        let remote = self.find_remote_queue(&name).ok_or_else(|| {
            AmqpError::not_found(format!("no queue '{name}' in vhost '{}'", self.name))
        })?;
        // As RabbitMQ's declare-ok, this one waits for the group to have a
        // leader. A member commits the arguments in effect (its policies)
        // first, after its own earlier proposal of them, so that they hold
        // from the queue's first message. A node that is not a member
        // proposes nothing (its arguments could land after a newer
        // policy's): it waits until a member knows the leader.
        if let Some(peers) = self.node.peers.get() {
            let member = remote
                .members
                .iter()
                .any(|m| *m == self.node.config.node_name);
            let ready = async {
                if member {
                    let args = self.replicated_args(&remote).0;
                    return peers.propose_replica_args(&self.name, &name, args).await;
                }
                loop {
                    if let Ok(s) = peers.replica_status(&self.name, &name).await {
                        if s.leader.is_some() {
                            return Ok(());
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            match tokio::time::timeout(DECLARE_WAITS_FOR_LEADER, ready).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(queue = %name, vhost = %self.name, %error, "a new replicated queue's group has no leader yet");
                }
                Err(_) => {
                    tracing::warn!(queue = %name, vhost = %self.name, "a new replicated queue's group has no leader yet (declare-ok sent anyway)");
                }
            }
        }
        Ok(remote)
    }

    /// The members of new queue `name` if it is to be replicated (in a
    /// cluster: a quorum queue, or a durable classic one a policy with
    /// `ha-mode` matches), else `None`.
    pub fn members_if_replicated(
        &self,
        name: &str,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        args: &QueueArgs,
        arguments: &FieldTable,
    ) -> Option<Vec<String>> {
        self.node.peers.get()?;
        if args.queue_type == queue_store::QueueType::Quorum {
            return Some(self.replica_members(name, arguments));
        }
        // RabbitMQ never mirrors an exclusive queue; Warren replicates
        // only what survives a restart and outlives its consumers.
        if !durable || exclusive || auto_delete {
            return None;
        }
        self.mirrored_members(name, arguments)
    }

    /// The members a new quorum queue `name` gets: its group size is
    /// `x-quorum-initial-group-size` (default 3), at most the running
    /// nodes (see [`Self::members_of_size`]).
    pub fn replica_members(&self, name: &str, arguments: &FieldTable) -> Vec<String> {
        let size = arguments
            .get("x-quorum-initial-group-size")
            .and_then(FieldValue::as_i64)
            .filter(|n| *n > 0)
            .map_or(3, |n| usize::try_from(n).unwrap_or(usize::MAX));
        self.members_of_size(name, arguments, size)
    }

    /// The members a new durable classic queue `name` gets when a policy
    /// with RabbitMQ 3.x's `ha-mode` matches it (`None` if none does):
    /// Warren replicates it as a quorum queue on `all` running nodes,
    /// `exactly` `ha-params` of them, or the `nodes` `ha-params` lists
    /// (those of them in the cluster; this node first if it is one).
    pub fn mirrored_members(&self, name: &str, arguments: &FieldTable) -> Option<Vec<String>> {
        let peers = self.node.peers.get()?;
        let (mode, params) = {
            let policies = self.policies.read();
            let p = crate::policy::for_queue(&policies, name)?;
            let mode = p.definition.get("ha-mode")?.as_str()?.to_owned();
            (mode, p.definition.get("ha-params").cloned())
        };
        match mode.as_str() {
            "all" => Some(self.members_of_size(name, arguments, usize::MAX)),
            "exactly" => {
                let n = params.as_ref()?.as_u64()?;
                Some(self.members_of_size(name, arguments, usize::try_from(n).ok()?))
            }
            "nodes" => {
                let known: Vec<String> = peers.members().into_iter().map(|m| m.name).collect();
                let me = &self.node.config.node_name;
                let mut listed: Vec<String> = params?
                    .as_array()?
                    .iter()
                    .filter_map(|v| v.as_str())
                    .filter(|n| known.iter().any(|k| k == n) || *n == me.as_str())
                    .map(str::to_owned)
                    .collect();
                listed.dedup();
                if let Some(i) = listed.iter().position(|n| n == me) {
                    listed.swap(0, i);
                }
                (!listed.is_empty()).then_some(listed)
            }
            _ => None,
        }
    }

    /// `size` members (at most the running nodes) for a new replicated
    /// queue `name`: the node `queue-leader-locator` picks comes first
    /// (this one for `client-local`), then the running nodes holding the
    /// fewest of this vhost's replicated queues.
    fn members_of_size(&self, name: &str, arguments: &FieldTable, size: usize) -> Vec<String> {
        let me = self.node.config.node_name.clone();
        let Some(peers) = self.node.peers.get() else {
            return vec![me];
        };
        let first = self
            .placement(name, arguments)
            .unwrap_or_else(|| me.clone());
        let mut load: std::collections::BTreeMap<String, usize> = peers
            .members()
            .into_iter()
            .filter(|m| m.running)
            .map(|m| (m.name, 0))
            .collect();
        load.insert(me, 0);
        for q in self.remote.iter() {
            for m in &q.members {
                if let Some(n) = load.get_mut(m) {
                    *n += 1;
                }
            }
        }
        load.remove(&first);
        let mut rest: Vec<(usize, String)> = load.into_iter().map(|(m, n)| (n, m)).collect();
        rest.sort();
        let mut members = vec![first];
        members.extend(
            rest.into_iter()
                .map(|(_, m)| m)
                .take(size.saturating_sub(1)),
        );
        members
    }

    /// Projects [`MetaCommand::DropTransient`]: the transient and exclusive
    /// queues an earlier run of node `home` held (or, dropped while it was
    /// down, all of them) are no longer routable. On `home` itself, its own
    /// such queues are deleted: the cluster dropped them while this node
    /// was cut off (its clients' consumers are cancelled).
    pub fn project_transient_dropped(&self, home: &str, before: u64) {
        if self.node.config.node_name == home {
            let doomed: Vec<Arc<QueueHandle>> = self
                .queues()
                .into_iter()
                .filter(|q| {
                    (!q.durable || q.exclusive_owner.is_some())
                        && crate::meta::queue_counter(q.id) < before
                })
                .collect();
            if let (false, Some(me)) = (doomed.is_empty(), self.me.upgrade()) {
                self.node.tracker.spawn(async move {
                    for q in doomed {
                        tracing::warn!(queue = %q.name, vhost = %me.name, "the cluster dropped this node's transient queue while it was cut off: deleting it");
                        let _ = me.delete_queue(&q, false).await;
                    }
                });
            }
            return;
        }
        let doomed: Vec<ShortStr> = self
            .remote
            .iter()
            .filter(|q| {
                (!q.durable || q.exclusive)
                    && q.home == home
                    && crate::meta::queue_counter(q.id) < before
            })
            .map(|q| q.name.clone())
            .collect();
        for name in doomed {
            self.project_queue_deleted(&name);
        }
    }

    /// Where a new, not exclusive queue `name` declared through this node
    /// goes: `None` here, else the name of another node. As RabbitMQ: the
    /// declare's `x-queue-leader-locator` (or 3.x's
    /// `x-queue-master-locator`), else the matching policy's
    /// `queue-leader-locator` (`queue-master-locator`); `client-local` (the
    /// default) keeps it here, `balanced` (`min-masters`; and `random`,
    /// which Warren treats alike) puts it on the running node that hosts
    /// the fewest of this vhost's queues, this node on a tie.
    pub fn placement(&self, name: &str, arguments: &FieldTable) -> Option<String> {
        let peers = self.node.peers.get()?;
        let from_args = ["x-queue-leader-locator", "x-queue-master-locator"]
            .iter()
            .find_map(|k| {
                arguments
                    .get(k)
                    .and_then(FieldValue::as_str)
                    .map(str::to_owned)
            });
        let locator = from_args.or_else(|| {
            let policies = self.policies.read();
            let p = crate::policy::for_queue(&policies, name)?;
            ["queue-leader-locator", "queue-master-locator"]
                .iter()
                .find_map(|k| p.definition.get(*k)?.as_str().map(str::to_owned))
        })?;
        if !matches!(locator.as_str(), "balanced" | "min-masters" | "random") {
            return None;
        }
        let me = self.node.config.node_name.as_str();
        let mut hosted: std::collections::HashMap<String, usize> = peers
            .members()
            .into_iter()
            .filter(|m| m.running)
            .map(|m| (m.name, 0))
            .collect();
        hosted.insert(me.to_owned(), self.queues.len());
        for q in self.remote.iter() {
            if let Some(n) = hosted.get_mut(&q.home) {
                *n += 1;
            }
        }
        let least = hosted.values().copied().min()?;
        if hosted.get(me) == Some(&least) {
            return None;
        }
        hosted
            .into_iter()
            .filter(|(_, n)| *n == least)
            .map(|(name, _)| name)
            .min()
    }

    /// In a cluster every exchange, queue and binding goes through the
    /// metadata log, transient ones too (RabbitMQ's transient objects are
    /// cluster-wide): every node's router follows the log. A node alone
    /// commits only the durable ones.
    fn logs_transient(&self) -> bool {
        self.node.peers.get().is_some()
    }

    /// Projects a queue's deletion made on another node (a queue homed
    /// elsewhere; one homed here is deleted by the node that ran it, here).
    pub fn project_queue_deleted(&self, name: &str) {
        if let Some((_, q)) = self.remote.remove(name) {
            self.remote_ids.remove(&q.id);
            self.router.write().remove_queue(QueueId(q.id));
        }
    }

    /// Projects a durable exchange declared on another node.
    pub fn project_exchange(&self, x: &ExchangeDef) {
        if self.router.read().exchange(&x.name).is_none() {
            self.recover_exchange(x);
        }
    }

    /// Projects an exchange's deletion made on another node.
    pub fn project_exchange_deleted(&self, name: &str) {
        let _ = self.router.write().delete_exchange(name, false);
    }

    /// Projects a binding made on another node (idempotent).
    pub fn project_bind(&self, b: &BindingDef) {
        let _ = self.router.write().bind(b);
    }

    /// Projects a binding removed on another node (idempotent).
    pub fn project_unbind(&self, b: &BindingDef) {
        let _ = self.router.write().unbind(b);
    }

    /// Refuses access to another connection's exclusive queue (405).
    pub fn check_exclusive(&self, q: &QueueHandle, connection: u64) -> Result<(), AmqpError> {
        match q.exclusive_owner {
            Some(owner) if owner != connection => Err(self.locked(&q.name)),
            _ => Ok(()),
        }
    }

    /// A redeclare must name the same exclusive owner as the queue has
    /// (`owner`: the declaring connection if the declare is exclusive), so
    /// an exclusive flag that differs is refused like another connection's
    /// queue (405, RabbitMQ's strict check).
    pub fn check_same_owner(&self, q: &QueueHandle, owner: Option<u64>) -> Result<(), AmqpError> {
        if q.exclusive_owner == owner {
            Ok(())
        } else {
            Err(self.locked(&q.name))
        }
    }

    /// RabbitMQ's 405 for a queue that is another connection's, or whose
    /// exclusive flag a redeclare does not match.
    pub fn locked(&self, queue: &str) -> AmqpError {
        AmqpError::resource_locked(format!(
            "cannot obtain exclusive access to locked queue '{queue}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
            self.name
        ))
    }

    /// The queue called `name`, usable by `connection` (404, 405).
    pub fn queue_for(&self, name: &str, connection: u64) -> Result<Arc<QueueHandle>, AmqpError> {
        let q = self.find_queue(name).ok_or_else(|| {
            AmqpError::not_found(format!("no queue '{name}' in vhost '{}'", self.name))
        })?;
        self.check_exclusive(&q, connection)?;
        Ok(q)
    }

    /// The metadata commands that make what the router `removed` durable:
    /// each binding unbound (a no-op for transient ones on a node alone)
    /// and each durable exchange deleted (every one, in a cluster).
    fn removed_commands(&self, removed: &Removed) -> Vec<MetaCommand> {
        let vhost = self.name.as_str();
        let unbinds = removed.bindings.iter().map(|b| MetaCommand::Unbind {
            vhost: vhost.to_owned(),
            binding: b.clone(),
        });
        let deletes = removed
            .exchanges
            .iter()
            .filter(|x| x.durable || self.logs_transient())
            .map(|x| MetaCommand::DeleteExchange {
                vhost: vhost.to_owned(),
                name: x.name.clone(),
            });
        unbinds.chain(deletes).collect()
    }

    /// Commits `commands` in order and waits until all are durable.
    async fn commit_all(&self, commands: Vec<MetaCommand>) -> Result<(), AmqpError> {
        Self::durable(self.submit_all(commands)).await
    }

    /// Submits `commands` in order: each takes its place in the log now.
    fn submit_all(&self, commands: Vec<MetaCommand>) -> Vec<crate::meta::Commit<'_>> {
        commands
            .into_iter()
            .map(|c| self.node.meta.commit(c))
            .collect()
    }

    /// Waits for submitted commands to be durable. Something already gone
    /// from the metadata (a cascade got there first) is not an error.
    async fn durable(commits: Vec<crate::meta::Commit<'_>>) -> Result<(), AmqpError> {
        for commit in commits {
            match commit.await {
                Ok(_) | Err(crate::meta::MetaError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// `exchange.declare`.
    pub async fn declare_exchange(
        &self,
        decl: ExchangeDeclare<'_>,
        passive: bool,
    ) -> Result<(), AmqpError> {
        let created = self.router.write().declare_exchange(decl, passive)?;
        if created && !self.policies.read().is_empty() {
            self.apply_exchange_policies();
        }
        if created && (decl.durable || self.logs_transient()) {
            let def = self.router.read().exchange(decl.name).cloned();
            if let Some(exchange) = def {
                let committed = self
                    .node
                    .meta
                    .commit(MetaCommand::DeclareExchange {
                        vhost: self.name.to_string(),
                        exchange,
                    })
                    .await;
                if let Err(e) = committed {
                    // Not committed (a cluster without a majority): it does
                    // not exist. (Until the router follows the log, it was
                    // made first and is taken back here.)
                    let _ = self.router.write().delete_exchange(decl.name, false);
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Deletes every exchange the vhost's clients declared (vhost deletion).
    pub async fn delete_exchanges(&self) {
        let names: Vec<ShortStr> = self
            .router
            .read()
            .exchanges()
            .filter(|x| !x.name.starts_with("amq."))
            .map(|x| x.name.clone())
            .collect();
        let mut commands = Vec::new();
        for name in names {
            let removed = self.router.write().delete_exchange(&name, false);
            if let Ok(removed) = removed {
                commands.extend(self.removed_commands(&removed));
            }
        }
        if let Err(e) = self.commit_all(commands).await {
            tracing::warn!(vhost = %self.name, error = %e.text, "deleting the vhost's exchanges");
        }
    }

    /// `exchange.delete`.
    pub async fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), AmqpError> {
        let removed = self.router.write().delete_exchange(name, if_unused)?;
        self.commit_all(self.removed_commands(&removed)).await
    }

    fn is_durable_binding(&self, b: &BindingDef) -> bool {
        let router = self.router.read();
        let source = router.exchange(&b.source).is_some_and(|x| x.durable);
        let dest = match &b.destination {
            Destination::Queue(q) => {
                self.find_queue(q).is_some_and(|q| q.durable) || self.remote.contains_key(q)
            }
            Destination::Exchange(x) => router.exchange(x).is_some_and(|x| x.durable),
        };
        source && dest
    }

    /// `queue.bind` / `exchange.bind`.
    pub async fn bind(&self, b: &BindingDef) -> Result<(), AmqpError> {
        let added = self.router.write().bind(b)?;
        if added && (self.logs_transient() || self.is_durable_binding(b)) {
            let committed = self
                .node
                .meta
                .commit(MetaCommand::Bind {
                    vhost: self.name.to_string(),
                    binding: b.clone(),
                })
                .await;
            if let Err(e) = committed {
                // Not committed: taken back (see `declare_exchange`).
                let _ = self.router.write().unbind(b);
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// `queue.unbind` / `exchange.unbind`.
    pub async fn unbind(&self, b: &BindingDef) -> Result<(), AmqpError> {
        let removed = self.router.write().unbind(b)?;
        self.commit_all(self.removed_commands(&removed)).await
    }

    /// Creates a queue (the caller checked it does not exist).
    #[allow(clippy::too_many_arguments)]
    pub async fn declare_queue(
        self: &Arc<Self>,
        name: ShortStr,
        durable: bool,
        auto_delete: bool,
        exclusive_owner: Option<u64>,
        args: QueueArgs,
        arguments: FieldTable,
    ) -> Result<Arc<QueueHandle>, AmqpError> {
        if let Some(max) = self.limits.lock().max_queues {
            if self.queues.len() >= max {
                return Err(AmqpError::precondition_failed(format!(
                    "cannot declare queue '{name}': queue limit in vhost '{}' ({max}) is reached",
                    self.name
                )));
            }
        }
        let logged = durable || self.logs_transient();
        if logged && !durable {
            // A stale transient queue of the same name from this node's
            // earlier run goes first.
            self.node.drop_earlier_transient().await?;
        }
        let id = self.node.next_queue_id();
        let mut queue = Queue::new(id, name.clone(), durable, args, arguments.clone(), now_ms());
        queue.set_memory_budget(self.node.config.queue_memory_budget);
        queue.set_spill_dir(self.node.spill_dir.clone());
        let handle = QueueHandle::new(
            queue,
            auto_delete,
            exclusive_owner,
            self.node.config.queue_flow_limit,
            self.tracer.clone(),
        );
        // Another connection may have created it meanwhile: first one wins.
        let handle = self
            .queues
            .entry(name.clone())
            .or_insert(handle)
            .value()
            .clone();
        if handle.id != id {
            return Ok(handle);
        }
        self.by_id.insert(id, handle.clone());
        self.router.write().add_queue(name.clone(), QueueId(id));
        if !self.policies.read().is_empty() || !self.operator_policies.read().is_empty() {
            self.apply_policy(&handle);
        }
        if logged {
            let committed = self
                .node
                .meta
                .commit(MetaCommand::DeclareQueue {
                    vhost: self.name.to_string(),
                    queue: QueueDef {
                        name: name.clone(),
                        id,
                        durable,
                        exclusive: exclusive_owner.is_some(),
                        auto_delete,
                        arguments,
                        home: self.node.queue_home(),
                        members: Vec::new(),
                        replaces: None,
                    },
                })
                .await;
            if let Err(e) = committed {
                // Not committed: taken back (see `declare_exchange`); it
                // holds no message yet that was confirmed.
                self.router.write().remove_queue(QueueId(id));
                self.by_id.remove(&id);
                self.queues.remove_if(&name, |_, q| q.id == id);
                return Err(e.into());
            }
        }
        self.spawn_housekeeping(handle.clone());
        self.node.metrics.queues_created.inc();
        Ok(handle)
    }

    /// Declares a queue as the management API and definitions import do
    /// (never exclusive): an existing queue must be equivalent (RabbitMQ's
    /// 406 otherwise). Returns whether it was created.
    pub async fn declare_or_check_queue(
        self: &Arc<Self>,
        name: ShortStr,
        durable: bool,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> Result<bool, AmqpError> {
        let m = amqp_codec::methods::QueueDeclare {
            queue: name,
            durable,
            auto_delete,
            arguments,
            ..Default::default()
        };
        if let Some(existing) = self.find_queue(&m.queue) {
            existing.check_equivalent(&m, &self.name)?;
            return Ok(false);
        }
        if let Some(remote) = self.find_remote_queue(&m.queue) {
            crate::queue::check_equivalent(
                &remote.name,
                &self.name,
                (remote.durable, remote.auto_delete, &remote.arguments),
                &m,
            )?;
            return Ok(false);
        }
        let args = QueueArgs::parse(&m.arguments, &m.queue, &self.name)?;
        args.check_properties(durable, false, auto_delete, &m.queue, &self.name)?;
        if let Some(members) =
            self.members_if_replicated(&m.queue, durable, false, auto_delete, &args, &m.arguments)
        {
            self.declare_replicated(m.queue, m.arguments, members)
                .await?;
            return Ok(true);
        }
        self.declare_queue(m.queue, durable, auto_delete, None, args, m.arguments)
            .await?;
        Ok(true)
    }

    /// Deletes a queue: its messages, bindings, consumers (who are told, if
    /// they asked to be) and durable record. Returns its ready-message count.
    ///
    /// With `only_if_unused` (auto-delete, `x-expires`), a queue that has
    /// gained a consumer meanwhile is kept: the check and the deletion happen
    /// under the queue's lock.
    /// `queue.delete` with its conditions: refused (406) if `if_unused`
    /// and it has consumers, or `if_empty` and it has messages.
    pub async fn delete_queue_if(
        &self,
        q: &Arc<QueueHandle>,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u64, AmqpError> {
        let counts = q.counters();
        if if_unused && counts.consumers > 0 {
            return Err(AmqpError::precondition_failed(format!(
                "queue '{}' in vhost '{}' in use",
                q.name, self.name
            )));
        }
        if if_empty && counts.ready > 0 {
            return Err(AmqpError::precondition_failed(format!(
                "queue '{}' in vhost '{}' not empty",
                q.name, self.name
            )));
        }
        self.delete_queue(q, false).await
    }

    pub async fn delete_queue(
        &self,
        q: &Arc<QueueHandle>,
        only_if_unused: bool,
    ) -> Result<u64, AmqpError> {
        let mut fx = Effects::default();
        let Some((count, consumers)) = q.kind().delete(only_if_unused, &mut fx) else {
            return Ok(0);
        };
        self.node.metrics.queues_deleted.inc();
        q.wake.notify_one();
        // Its publishers must not wait for a queue that is gone.
        q.flow.lower();
        for c in &consumers {
            notify_cancel(c);
        }
        self.queues.remove(&q.name);
        self.by_id.remove(&q.id);
        let removed = self.router.write().remove_queue(QueueId(q.id));
        // The definition goes before the queue's index (submitted by
        // `apply`): a crash between the two leaves an index without a
        // definition, which boot drops.
        let mut commands = Vec::new();
        if q.durable || self.logs_transient() {
            commands.push(MetaCommand::DeleteQueue {
                vhost: self.name.to_string(),
                name: q.name.clone(),
            });
        }
        commands.extend(self.removed_commands(&removed));
        let commits = self.submit_all(commands);
        self.apply(&mut fx);
        Self::durable(commits).await?;
        tracing::info!(queue = %q.name, vhost = %self.name, "queue deleted");
        Ok(count)
    }

    /// `queue.purge`.
    pub fn purge(&self, q: &QueueHandle) -> u64 {
        let mut fx = Effects::default();
        let n = q.kind().purge(&mut fx);
        self.apply(&mut fx);
        n
    }

    /// Removes a consumer; an auto-delete queue goes with its last one.
    pub fn cancel_consumer(&self, q: &Arc<QueueHandle>, tag: &ShortStr) {
        let now_unused = q.kind().cancel(tag);
        q.wake.notify_one();
        if now_unused && q.auto_delete {
            let (q, me) = (q.clone(), self.me.clone());
            self.node.tracker.spawn(async move {
                if let Some(v) = me.upgrade() {
                    if let Err(e) = v.delete_queue(&q, true).await {
                        tracing::warn!(error = %e, "auto-delete failed");
                    }
                }
            });
        }
    }

    /// Settles deliveries (ack, requeue, reject), then lets the queues deliver
    /// again (credit came back).
    pub fn settle(&self, unacked: Vec<Unacked>, how: Settle) {
        self.settle_then(unacked, how, true);
    }

    /// Settles deliveries; lets their queues deliver again only if `dispatch`
    /// (a channel with a channel-wide prefetch dispatches its own queues in
    /// turn instead, see [`Vhost::dispatch_channel`]).
    pub fn settle_then(&self, unacked: Vec<Unacked>, how: Settle, dispatch: bool) {
        let mut fx = Effects::default();
        let mut i = 0;
        // Group by queue so each queue is locked once.
        let mut unacked = unacked;
        unacked.sort_by_key(|u| u.queue);
        while i < unacked.len() {
            let qid = unacked[i].queue;
            let j = unacked[i..]
                .iter()
                .position(|u| u.queue != qid)
                .map_or(unacked.len(), |p| i + p);
            if self.queue_by_id(qid).is_none() {
                self.settle_remote(qid, &unacked[i..j], how);
            }
            if let Some(q) = self.queue_by_id(qid) {
                if how == Settle::Ack {
                    self.node.metrics.acknowledged.inc_by((j - i) as u64);
                    q.stats
                        .acked
                        .fetch_add((j - i) as u64, std::sync::atomic::Ordering::Relaxed);
                }
                for u in &unacked[i..j] {
                    if let Some(c) = &u.consumer_unacked {
                        c.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                let mut seqs = unacked[i..j].iter().map(|u| u.seq);
                q.settle(how, &mut seqs, dispatch, &mut fx);
            }
            i = j;
        }
        self.apply(&mut fx);
    }

    /// Lets one queue deliver to its consumers.
    pub fn dispatch(&self, q: &QueueHandle) {
        let mut fx = Effects::default();
        q.dispatch(&mut fx);
        self.apply(&mut fx);
    }

    /// Lets every queue a channel consumes from deliver (credit came back),
    /// starting with the consumer at `start` (mod their number): callers
    /// rotate it, so that credit shared by the channel (a global prefetch,
    /// room in the connection's outbox) goes to each queue in turn rather
    /// than always to the first (RabbitMQ's limiter varies the order too).
    pub fn dispatch_channel(&self, consumers: &[(ShortStr, Arc<QueueHandle>)], start: usize) {
        let n = consumers.len();
        for i in 0..n {
            if let Some((_, q)) = consumers.get((start + i) % n) {
                self.dispatch(q);
            }
        }
    }

    /// Applies a queue operation's effects: trace copies and dead letters
    /// are routed and published, then writes submitted, then references
    /// released.
    pub fn apply(&self, fx: &mut Effects) {
        if self.tracer.is_on() {
            self.publish_traces(fx);
        }
        // Dead letters can produce more (a full DLX queue dropping its head):
        // iterate until quiet, bounded so a pathological setup cannot spin.
        // Those whose body is paged out are read on the blocking pool by the
        // vhost's dead-letter task, which publishes them after; so are all
        // that come after them (here or in a later call), so the order
        // holds.
        let mut later = Vec::new();
        for _ in 0..16 {
            let requests = std::mem::take(&mut fx.dead_letters);
            if requests.is_empty() {
                break;
            }
            for r in &requests {
                self.node.metrics.dead_letter(r.reason, true);
            }
            for r in requests {
                let behind = !later.is_empty()
                    || self
                        .dead_letters_behind
                        .load(std::sync::atomic::Ordering::Acquire)
                        > 0;
                match &r.message {
                    MessageRef::Loaded(original) if !behind => {
                        let original = original.clone();
                        self.publish_dead_letter(&r, &original, fx);
                    }
                    MessageRef::Loaded(_) => later.push(r),
                    MessageRef::Paged(id) => {
                        // Its reference is released once the body is read.
                        if let Some(i) = fx.releases.iter().position(|x| x == id) {
                            fx.releases.swap_remove(i);
                        }
                        later.push(r);
                    }
                }
            }
        }
        fx.dead_letters.clear();
        if !later.is_empty() {
            self.dead_letter_later(later);
        }
        // Deliveries of dead letters made trace copies too.
        if self.tracer.is_on() {
            self.publish_traces(fx);
        }
        for reason in fx.discarded.drain(..) {
            self.node.metrics.dead_letter(reason, false);
        }
        if !fx.writes.is_empty() {
            self.node.store.submit(fx.writes.drain(..));
        }
        for id in fx.releases.drain(..) {
            self.node.store.release(id);
        }
        if !fx.spilled_removals.is_empty() {
            self.release_spilled(std::mem::take(&mut fx.spilled_removals));
        }
    }

    /// Removed entries whose spilled chunk is on disk (a purged or deleted
    /// deep queue): the chunks are read on the blocking pool, then their
    /// index deletions and body releases are submitted.
    fn release_spilled(&self, removals: Vec<queue_store::SpilledRemoval>) {
        let store = self.node.store.clone();
        let vhost = self.name.clone();
        self.node.tracker.spawn(async move {
            let read = tokio::task::spawn_blocking(move || {
                removals
                    .into_iter()
                    .map(queue_store::SpilledRemoval::run)
                    .collect::<Vec<_>>()
            })
            .await;
            let Ok(read) = read else {
                tracing::error!(vhost = %vhost, "reading removed spilled entries did not finish; their bodies stay stored");
                return;
            };
            for r in read {
                match r {
                    Ok((writes, releases)) => {
                        store.submit(writes);
                        for id in releases {
                            store.release(id);
                        }
                    }
                    Err(e) => {
                        tracing::error!(vhost = %vhost, error = %e, "cannot read removed spilled entries; their bodies stay stored");
                    }
                }
            }
        });
    }

    /// Hands dead letters to the vhost's dead-letter task, behind those
    /// already there.
    fn dead_letter_later(&self, batch: Vec<DeadLetterRequest>) {
        self.dead_letters_behind
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let mut later = self.dead_letters_later.lock();
        let queue = later.get_or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            self.node
                .tracker
                .spawn(publish_dead_letters_later(self.me.clone(), rx));
            tx
        });
        if queue.send(batch).is_err() {
            self.dead_letters_behind
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// Routes one dead letter through its dead-letter exchange and publishes
    /// it to the queues it reaches (never back to a queue it already died in).
    fn publish_dead_letter(&self, r: &DeadLetterRequest, original: &Message, fx: &mut Effects) {
        let (message, headers, targets) = self.route_dead_letter(r, original);
        for qid in targets {
            let Some(q) = self.queue_by_id(qid) else {
                self.dead_letter_remote(qid, &message, headers.as_ref());
                continue;
            };
            if is_cycle(headers.as_ref(), &q.name) {
                continue;
            }
            q.publish(&message, &self.node.store, fx);
        }
    }

    /// Dead letter `r` of `original` as its dead-letter exchange routes it:
    /// the copy to publish, its headers, and the ids of the queues it goes
    /// to (a missing exchange routes it nowhere, as RabbitMQ drops it).
    fn route_dead_letter(
        &self,
        r: &DeadLetterRequest,
        original: &Message,
    ) -> (Arc<Message>, Option<FieldTable>, Vec<u64>) {
        let dl = r.build(original, now_ms());
        let headers = dl.header.properties.headers().ok().flatten();
        let mut routed = exchange::Routed::default();
        let mut targets = Vec::new();
        for key in &dl.routing_keys {
            if self
                .router
                .read()
                .route_dead_letter(&dl.exchange, key, headers.as_ref(), &mut routed)
                .is_ok()
            {
                targets.extend(routed.queues().iter().map(|q| q.0));
            }
        }
        targets.sort_unstable();
        targets.dedup();
        let message = Message::new(
            self.node.store.next_message_id(),
            dl.exchange.clone(),
            dl.routing_keys.first().cloned().unwrap_or_default(),
            dl.header,
            dl.body,
        );
        (message, headers, targets)
    }

    /// Dead-letters `r` as a confirmed publish: RabbitMQ's `at-least-once`
    /// strategy, for a replicated queue that holds its dead letters until
    /// their queues have them. Done once every queue its dead-letter
    /// exchange routes it to has it (on disk if it is persistent, a
    /// majority's for a replicated queue); `Err` says why not (it routes
    /// nowhere, a queue refused it, one could not be reached), and the
    /// caller tries again later, to every queue (a queue that took it
    /// before gets it twice: at least once). A dead letter that would
    /// cycle back is dropped from the queues it would cycle through, as
    /// every dead letter is.
    pub fn dead_letter_confirmed(
        &self,
        r: &DeadLetterRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>> {
        let MessageRef::Loaded(original) = &r.message else {
            return Box::pin(std::future::ready(Err(
                "its body is not in memory".to_owned()
            )));
        };
        let (message, headers, targets) = self.route_dead_letter(r, original);
        if targets.is_empty() {
            return Box::pin(std::future::ready(Err(format!(
                "exchange '{}' routes it to no queue",
                message.exchange
            ))));
        }
        let mut fx = Effects::default();
        let mut wrote = false;
        let mut refused = Vec::new();
        let mut remote = Vec::new();
        let peers = self.node.peers.get();
        for qid in targets {
            if let Some(q) = self.queue_by_id(qid) {
                if is_cycle(headers.as_ref(), &q.name) {
                    continue;
                }
                match q.publish(&message, &self.node.store, &mut fx) {
                    Some(p) if p.refused => refused.push(q.name.to_string()),
                    Some(p) => wrote |= p.wrote,
                    None => refused.push(q.name.to_string()),
                }
                continue;
            }
            let Some(name) = self.remote_ids.get(&qid).map(|n| n.value().clone()) else {
                continue;
            };
            if is_cycle(headers.as_ref(), &name) {
                continue;
            }
            let (Some(peers), Some(q)) = (peers, self.remote.get(&name)) else {
                refused.push(name.to_string());
                continue;
            };
            let outcome = self.send_remote(peers.as_ref(), &q.home, name.clone(), &message);
            drop(q);
            remote.push((name, outcome));
        }
        self.apply(&mut fx);
        let commit = wrote.then(|| self.node.store.commit());
        let metrics = self.node.metrics.clone();
        let reason = r.reason;
        Box::pin(async move {
            if let Some(commit) = commit {
                commit.await.map_err(|e| e.to_string())?;
            }
            for (name, outcome) in remote {
                match outcome.await {
                    Ok(e) if e.refused => refused.push(name.to_string()),
                    Ok(_) => {}
                    Err(e) => return Err(format!("queue '{name}': {e}")),
                }
            }
            if !refused.is_empty() {
                return Err(format!(
                    "refused by {} (x-overflow reject-publish, or deleted)",
                    refused.join(", ")
                ));
            }
            metrics.dead_letter_at_least_once(reason);
            Ok(())
        })
    }

    /// Sends a dead letter to queue `id` if it lives on another node (or is
    /// replicated): as RabbitMQ's `at-most-once` dead-lettering, nothing
    /// waits for it, and one its home does not take is logged.
    fn dead_letter_remote(&self, id: u64, message: &Message, headers: Option<&FieldTable>) {
        let Some(peers) = self.node.peers.get() else {
            return;
        };
        let Some(name) = self.remote_ids.get(&id).map(|n| n.value().clone()) else {
            return;
        };
        if is_cycle(headers, &name) {
            return;
        }
        let Some(q) = self.remote.get(&name) else {
            return;
        };
        let outcome = self.send_remote(peers.as_ref(), &q.home, name.clone(), message);
        drop(q);
        let vhost = self.name.clone();
        self.node.tracker.spawn(async move {
            match outcome.await {
                Ok(e) if e.refused => {
                    tracing::warn!(%vhost, queue = %name, "a dead letter was refused by its target queue (x-overflow reject-publish) and dropped");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(%vhost, queue = %name, error = %e, "a dead letter could not reach its target queue on another node and was dropped");
                }
            }
        });
    }

    /// Routes the firehose's pending copies through `amq.rabbitmq.trace`
    /// (copies of its own messages are never made, so this ends).
    fn publish_traces(&self, fx: &mut Effects) {
        let exchange = ShortStr::from_static(crate::trace::TRACE_EXCHANGE);
        let mut routed = exchange::Routed::default();
        for copy in self.tracer.take() {
            // (The trace exchange is internal: routed like a dead letter.)
            if self
                .router
                .read()
                .route_dead_letter(&exchange, &copy.routing_key, None, &mut routed)
                .is_err()
            {
                continue;
            }
            let message = Message::new(
                self.node.store.next_message_id(),
                exchange.clone(),
                copy.routing_key,
                copy.header,
                copy.body,
            );
            for &qid in routed.queues() {
                let Some(q) = self.queue_by_id(qid.0) else {
                    continue;
                };
                q.publish(&message, &self.node.store, fx);
            }
        }
    }

    /// Topic permissions, which apply to topic exchanges only: `access` to
    /// `routing_key` on `exchange` for `user`.
    pub fn check_topic(
        &self,
        auth: &crate::auth::Auth,
        user: &str,
        exchange: &str,
        routing_key: &str,
        access: crate::auth::Access,
    ) -> Result<(), AmqpError> {
        let topic = self
            .router
            .read()
            .exchange(exchange)
            .is_some_and(|x| x.kind == exchange::ExchangeKind::Topic);
        if topic {
            auth.check_topic(user, &self.name, exchange, routing_key, access)
        } else {
            Ok(())
        }
    }

    /// Routes a published message and enqueues it on every queue it reached:
    /// the one path for `basic.publish` and the management API's publish.
    /// Counts it in the metrics and the memory accounting; store writes and
    /// dead letters are applied before returning.
    pub fn enqueue(
        &self,
        p: Publish<'_>,
        routed: &mut exchange::Routed,
        fx: &mut Effects,
    ) -> Result<Enqueue, AmqpError> {
        check_sender_selected(p.headers.as_ref())?;
        self.router
            .read()
            .route(p.exchange, p.routing_key, p.headers.as_ref(), routed)?;
        let trace_keys = self
            .tracer
            .is_on()
            .then(|| crate::trace::routing_keys(p.routing_key, p.headers.as_ref()));
        let header = if routed.has_bcc() {
            strip_bcc(p.header, p.headers)
        } else {
            p.header
        };
        let message = Message::new(
            self.node.store.next_message_id(),
            p.exchange.clone(),
            p.routing_key.clone(),
            header,
            p.body,
        );
        if let Some(keys) = trace_keys {
            let queues = routed
                .queues()
                .iter()
                .filter_map(|q| self.queue_by_id(q.0))
                .map(|q| FieldValue::LongStr(q.name.clone().into_bytes()))
                .collect();
            self.tracer
                .published(&self.name, &message, keys, queues, p.publisher);
        }
        let mut out = Enqueue {
            message,
            refused: false,
            wrote: false,
            unroutable: routed.is_unroutable(),
            congested: Vec::new(),
            remote: Vec::new(),
        };
        let mut here = 0;
        for &qid in routed.queues() {
            let Some(queue) = self.queue_by_id(qid.0) else {
                self.enqueue_remote(qid.0, &mut out);
                continue;
            };
            let Some(published) = queue.publish(&out.message, &self.node.store, fx) else {
                // Deleted since it was routed to. A classic queue whose
                // messages moved into its replicated successor: on to it
                // (`vhost/mirroring.rs`); any other: gone, as in RabbitMQ.
                if self.moved.contains_key(&qid.0) {
                    self.enqueue_remote(qid.0, &mut out);
                }
                continue;
            };
            here += 1;
            out.refused |= published.refused;
            out.wrote |= published.wrote;
            if published.congested {
                out.congested.push(queue.flow.clone());
            }
        }
        if out.wrote && self.node.store.flow().is_raised() {
            out.congested.push(self.node.store.flow().clone());
        }
        self.node.metrics.received.inc();
        self.node
            .metrics
            .message_sizes
            .observe(out.message.body.len() as u64);
        // (Copies for queues on other nodes count there.)
        self.node.metrics.queue_published.inc_by(here);
        match (out.unroutable, p.mandatory) {
            (false, _) => self.node.metrics.routed.inc(),
            (true, true) => self.node.metrics.unroutable_returned.inc(),
            (true, false) => self.node.metrics.unroutable_dropped.inc(),
        };
        self.node
            .alarms
            .note_published(out.message.size(), routed.queues().len() as u64);
        self.apply(fx);
        Ok(out)
    }

    /// Settles deliveries of the queue with id `id`, if it lives on another
    /// node: the settlement goes to its home.
    fn settle_remote(&self, id: u64, unacked: &[Unacked], how: Settle) {
        let Some(peers) = self.node.peers.get() else {
            return;
        };
        // A queue that was classic when they were taken is settled on its
        // old home, which is moving what is left of it into the group.
        let q = match self.remote_ids.get(&id).map(|n| n.value().clone()) {
            Some(name) => self.find_remote_queue(&name),
            None => self.moved.get(&id).map(|q| q.value().clone()),
        };
        let Some(q) = q else {
            return;
        };
        if how == Settle::Ack {
            self.node.metrics.acknowledged.inc_by(unacked.len() as u64);
        }
        let seqs = unacked.iter().map(|u| u.seq).collect();
        peers.settle(&q.home, &self.name, &q.name, id, seqs, how);
    }

    /// `basic.get` for another node, on a queue homed here.
    pub async fn get_from_peer(
        &self,
        queue: &str,
        ack: bool,
    ) -> Result<Option<crate::peers::RemoteDelivery>, String> {
        let q = self
            .find_queue(queue)
            .ok_or_else(|| format!("no queue '{queue}' in vhost '{}' on this node", self.name))?;
        let mut fx = Effects::default();
        let got = q.get(ack, &mut fx);
        self.apply(&mut fx);
        let Some(d) = got else {
            return Ok(None);
        };
        let Some(msg) = crate::queue::load_off_worker(&d.message, &self.node.store).await else {
            // Its body could not be read: as for a local get, nothing.
            return Ok(None);
        };
        let mut header = bytes::BytesMut::new();
        msg.header.encode(&mut header);
        Ok(Some(crate::peers::RemoteDelivery {
            seq: d.seq,
            redelivered: d.redelivered,
            delivery_count: d.delivery_count,
            remaining: d.remaining as u32,
            exchange: msg.exchange.clone(),
            routing_key: msg.routing_key.clone(),
            header: header.freeze(),
            body: msg.body.clone(),
        }))
    }

    /// Settles deliveries another node took from queue `queue` (homed
    /// here) with id `id` (0: whichever has the name; a classic queue
    /// moving into its replicated successor is still found by it).
    pub fn settle_from_peer(&self, queue: &str, id: u64, seqs: &[u64], how: Settle) {
        let q = if id == 0 {
            self.find_queue(queue)
                .or_else(|| self.moving.get(queue).map(|q| q.value().clone()))
        } else {
            self.queue_by_id(id).filter(|q| q.name.as_str() == queue)
        };
        let Some(q) = q else {
            return;
        };
        let mut fx = Effects::default();
        if how == Settle::Ack {
            q.stats
                .acked
                .fetch_add(seqs.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        q.settle(how, &mut seqs.iter().copied(), true, &mut fx);
        self.apply(&mut fx);
    }

    /// Sends `message` to queue `queue` of this vhost on node `home` (or,
    /// replicated, to its group): what the node does with it.
    fn send_remote(
        &self,
        peers: &dyn crate::peers::Peers,
        home: &str,
        queue: ShortStr,
        message: &Message,
    ) -> crate::peers::RemoteOutcome {
        let mut header = bytes::BytesMut::new();
        message.header.encode(&mut header);
        peers.enqueue(
            home,
            crate::peers::RemotePublish {
                vhost: self.name.to_string(),
                queue,
                exchange: message.exchange.clone(),
                routing_key: message.routing_key.clone(),
                header: header.freeze(),
                body: message.body.clone(),
            },
        )
    }

    /// Sends `message` to the queue with id `id` on its home node, if it is
    /// a queue on another node.
    fn enqueue_remote(&self, id: u64, out: &mut Enqueue) {
        let Some(peers) = self.node.peers.get() else {
            return;
        };
        // (A classic queue that became replicated since the message was
        // routed: its name now reaches its successor.)
        let Some(name) = self
            .remote_ids
            .get(&id)
            .map(|n| n.value().clone())
            .or_else(|| self.moved.get(&id).map(|q| q.name.clone()))
        else {
            return;
        };
        // (Read in place: nothing of the entry is copied per message.)
        let Some(q) = self.remote.get(&name) else {
            return;
        };
        let pending = self.send_remote(peers.as_ref(), &q.home, name, &out.message);
        out.remote.push(crate::peers::Pending(pending));
        if let Some(gate) = peers.flow(&q.home) {
            if gate.is_raised() {
                out.congested.push(gate);
            }
        }
    }

    /// Enqueues a message sent by another node into local queue `queue`
    /// (its home is here). Returns what the queue did, the store commit to
    /// wait for and the gates to wait on before answering ([`PeerEnqueue`]).
    pub fn enqueue_from_peer(&self, p: crate::peers::RemotePublish) -> Result<PeerEnqueue, String> {
        let Some(queue) = self.find_queue(&p.queue) else {
            // Sent while the queue was classic and homed here; it has been
            // replicated since: on to its group.
            if let (Some(peers), Some(q)) = (self.node.peers.get(), self.remote.get(&p.queue)) {
                if q.replicated() {
                    let home = q.home.clone();
                    drop(q);
                    return Ok(PeerEnqueue {
                        refused: false,
                        commit: None,
                        congested: Vec::new(),
                        forwarded: Some(peers.enqueue(&home, p)),
                    });
                }
            }
            return Err(format!(
                "no queue '{}' in vhost '{}' on this node",
                p.queue, self.name
            ));
        };
        let header = amqp_codec::ContentHeader::decode(&p.header)
            .map_err(|e| format!("content header: {e}"))?;
        let message = Message::new(
            self.node.store.next_message_id(),
            p.exchange,
            p.routing_key,
            header,
            p.body,
        );
        let mut fx = Effects::default();
        let published = queue.publish(&message, &self.node.store, &mut fx);
        self.node.metrics.received.inc();
        if published.is_some() {
            self.node.metrics.queue_published.inc();
        }
        self.node.alarms.note_published(message.size(), 1);
        self.apply(&mut fx);
        let Some(published) = published else {
            return Ok(PeerEnqueue {
                refused: false,
                commit: None,
                congested: Vec::new(),
                forwarded: None,
            });
        };
        let commit = published
            .wrote
            .then(|| -> StoreCommit { Box::pin(self.node.store.commit()) });
        // As a local publisher's connection stops being read while the queue
        // (`queue_flow_limit`) or the store is congested, the answer to the
        // peer waits for their gates: the peer's backlog of unanswered
        // enqueues then pauses its publishers.
        let mut congested = Vec::new();
        if published.congested {
            congested.push(queue.flow.clone());
        }
        if published.wrote && self.node.store.flow().is_raised() {
            congested.push(self.node.store.flow().clone());
        }
        Ok(PeerEnqueue {
            refused: published.refused,
            commit,
            congested,
            forwarded: None,
        })
    }

    /// A queue's timer: expires messages as their TTL runs out (so an idle queue
    /// dead-letters promptly) and deletes the queue when `x-expires` says it has
    /// been unused too long.
    fn spawn_housekeeping(&self, q: Arc<QueueHandle>) {
        let Some(vhost) = self.me.upgrade() else {
            return;
        };
        let node = self.node.clone();
        self.node.tracker.spawn(async move {
            loop {
                // Spill files are written and read here, and bodies a
                // consumer waits for that are paged out are read here, off
                // the queue's lock and the runtime's workers.
                let mut fx = Effects::default();
                if q.spill_io(&mut fx).await || q.page_in(&node.store, &mut fx).await {
                    vhost.apply(&mut fx);
                    continue;
                }
                let Some((deadline, unused_deadline)) = q.kind().deadlines() else {
                    return;
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
                    _ = node.shutdown.cancelled() => return,
                    _ = q.wake.notified() => continue,
                    _ = sleep => {}
                }
                let now = now_ms();
                // (A classic queue moving into its replicated successor is
                // unused by design; expiring it would delete the successor.)
                if unused_deadline.is_some_and(|d| d <= now) && !vhost.is_moving(&q) {
                    let still_unused = q.kind().unused_since_deadline(now);
                    if still_unused {
                        tracing::info!(queue = %q.name, "queue expired (x-expires)");
                        let _ = vhost.delete_queue(&q, true).await;
                        return;
                    }
                }
                let mut fx = Effects::default();
                q.expire(now, &mut fx);
                vhost.apply(&mut fx);
            }
        });
    }

    /// Rebuilds a durable exchange (at boot), or in a cluster any exchange
    /// the metadata log holds.
    pub fn recover_exchange(&self, x: &ExchangeDef) {
        let decl = ExchangeDeclare {
            name: &x.name,
            kind: x.kind.as_str(),
            durable: x.durable,
            auto_delete: x.auto_delete,
            internal: x.internal,
            arguments: &x.arguments,
        };
        if let Err(e) = self.router.write().declare_exchange(decl, false) {
            tracing::warn!(exchange = %x.name, error = %e, "cannot recover exchange");
        }
    }

    /// Rebuilds a durable queue and its messages (at boot). Policies are
    /// applied once everything is recovered.
    pub fn recover_queue(self: &Arc<Self>, def: &QueueDef, recovered: &mut queue_store::Recovered) {
        let handle = self.rebuild_queue(def, def.id, def.auto_delete, recovered);
        self.queues.insert(def.name.clone(), handle.clone());
        self.by_id.insert(def.id, handle.clone());
        self.router
            .write()
            .add_queue(def.name.clone(), QueueId(def.id));
        self.spawn_housekeeping(handle);
    }

    /// Durable queue `def` (stored under id `id`) with the messages the
    /// store still holds of it (at boot), spilling set up first so that a
    /// deep queue is rebuilt a window at a time.
    fn rebuild_queue(
        &self,
        def: &QueueDef,
        id: u64,
        auto_delete: bool,
        recovered: &mut queue_store::Recovered,
    ) -> Arc<QueueHandle> {
        let args = QueueArgs::parse(&def.arguments, &def.name, &self.name).unwrap_or_default();
        let entries = recovered.queues.remove(&id).unwrap_or_default();
        let mut queue = Queue::new(
            id,
            def.name.clone(),
            true,
            args,
            def.arguments.clone(),
            now_ms(),
        );
        queue.set_memory_budget(self.node.config.queue_memory_budget);
        queue.set_spill_dir(self.node.spill_dir.clone());
        queue.restore(entries, recovered.clean_shutdown);
        self.node.note_queue_id(id);
        QueueHandle::new(
            queue,
            auto_delete,
            None,
            self.node.config.queue_flow_limit,
            self.tracer.clone(),
        )
    }

    /// Rebuilds a durable binding (at boot).
    pub fn recover_binding(&self, b: &BindingDef) {
        if let Err(e) = self.router.write().bind(b) {
            tracing::warn!(error = %e, "cannot recover binding");
        }
    }
}

/// `CC` and `BCC` must be arrays (of routing keys): anything else is 406,
/// naming the type as RabbitMQ does.
fn check_sender_selected(headers: Option<&FieldTable>) -> Result<(), AmqpError> {
    let Some(headers) = headers else {
        return Ok(());
    };
    for name in ["CC", "BCC"] {
        match headers.get(name) {
            None | Some(FieldValue::Array(_)) => {}
            Some(other) => {
                return Err(AmqpError::precondition_failed(format!(
                    "invalid message: {{unacceptable_type_in_header,\"{name}\",{}}}",
                    queue_store::args::type_name(other)
                )));
            }
        }
    }
    Ok(())
}

/// Removes the `BCC` header before delivery (sender-selected distribution).
fn strip_bcc(
    header: amqp_codec::ContentHeader,
    headers: Option<FieldTable>,
) -> amqp_codec::ContentHeader {
    header.with_properties(|p| {
        let mut h = headers.unwrap_or_default();
        h.remove("BCC");
        p.headers = Some(h);
    })
}

/// RabbitMQ's validated user-id: a published `user-id` must be the
/// publisher's own user name, unless the publisher has the `impersonator`
/// tag (looked up only when the names differ).
pub fn check_user_id(
    claimed: Option<&str>,
    user: &str,
    auth: &crate::auth::Auth,
) -> Result<(), AmqpError> {
    match claimed {
        Some(claimed) if claimed != user => {
            let impersonator = auth
                .user(user)
                .is_some_and(|u| u.tags.iter().any(|t| t == "impersonator"));
            if impersonator {
                Ok(())
            } else {
                Err(AmqpError::precondition_failed(format!(
                    "user_id property set to '{claimed}' but authenticated user was '{user}'"
                )))
            }
        }
        _ => Ok(()),
    }
}

/// A vhost's dead-letter task: publishes each batch in order, reading the
/// paged-out bodies on the blocking pool (never on an async worker or under
/// a queue's lock) first; their references are released after. Ends with
/// the node's shutdown or the vhost.
async fn publish_dead_letters_later(
    vhost: std::sync::Weak<Vhost>,
    mut batches: tokio::sync::mpsc::UnboundedReceiver<Vec<DeadLetterRequest>>,
) {
    loop {
        let Some(shutdown) = vhost.upgrade().map(|v| v.node.shutdown.clone()) else {
            return;
        };
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return,
            b = batches.recv() => match b { Some(b) => b, None => return },
        };
        let Some(vhost) = vhost.upgrade() else {
            return;
        };
        let paged: Vec<MessageId> = batch
            .iter()
            .filter(|r| matches!(r.message, MessageRef::Paged(_)))
            .map(|r| r.message.id())
            .collect();
        let bodies: std::collections::HashMap<MessageId, Arc<Message>> = if paged.is_empty() {
            std::collections::HashMap::new()
        } else {
            let (loaded, failed) =
                crate::queue::load_all_off_worker(paged.clone(), &vhost.node.store).await;
            for id in &failed {
                tracing::error!(vhost = %vhost.name, message = id.0, "cannot read a paged message to dead-letter it; it is dropped");
            }
            loaded.into_iter().map(|m| (m.id, m)).collect()
        };
        let mut fx = Effects::default();
        for r in &batch {
            let original = match &r.message {
                MessageRef::Loaded(m) => Some(m),
                MessageRef::Paged(id) => bodies.get(id),
            };
            if let Some(original) = original {
                vhost.publish_dead_letter(r, original, &mut fx);
            }
        }
        vhost.apply(&mut fx);
        for id in paged {
            vhost.node.store.release(id);
        }
        vhost
            .dead_letters_behind
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}
