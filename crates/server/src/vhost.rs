//! [`Vhost`]: one virtual host's routing table and queues, and every
//! operation that changes them (declare, bind, delete, settle), including
//! persisting durable definitions before the client is told they exist.
//!
//! A vhost's exchanges, queues and bindings change through these methods
//! (AMQP methods, the management API, definitions import and boot recovery
//! all call them); users, permissions, policies and limits change through
//! `Broker` and `Auth`. Before Warren clusters, both become one command
//! path that a replicated log can carry.

use std::sync::Arc;

use amqp_codec::{FieldTable, FieldValue, ShortStr};
use bytes::{BufMut, Bytes, BytesMut};
use dashmap::DashMap;
use exchange::{BindingDef, Destination, ExchangeDeclare, ExchangeDef, QueueId, Removed, Router};
use parking_lot::RwLock;
use queue_store::{
    DefKind, Effects, Message, Queue, QueueArgs, Write, dead_letter::is_cycle, scoped_name,
};

use crate::broker::Broker;
use crate::channel::{Settle, Unacked};
use crate::error::AmqpError;
use crate::queue::{QueueHandle, load, notify_cancel, now_ms};

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
}

/// A virtual host.
#[derive(Debug)]
pub struct Vhost {
    name: ShortStr,
    /// Exchanges and bindings.
    pub router: RwLock<Router>,
    queues: DashMap<ShortStr, Arc<QueueHandle>>,
    by_id: DashMap<u64, Arc<QueueHandle>>,
    /// Cancelled when the vhost is deleted: its connections close.
    pub closed: tokio_util::sync::CancellationToken,
    /// Open connections to this vhost.
    pub connections: std::sync::atomic::AtomicUsize,
    /// Per-vhost limits (RabbitMQ's `max-connections`, `max-queues`).
    pub limits: parking_lot::Mutex<VhostLimits>,
    /// Policies of this vhost.
    pub policies: RwLock<Vec<crate::policy::Policy>>,
    /// The firehose switch and its pending copies (shared with the queues).
    pub tracer: Arc<crate::trace::Tracer>,
}

/// Per-vhost limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VhostLimits {
    /// Most connections to the vhost at once.
    pub max_connections: Option<usize>,
    /// Most queues in the vhost.
    pub max_queues: Option<usize>,
}

impl VhostLimits {
    /// RabbitMQ's name of the connection limit.
    pub const CONNECTIONS: &'static str = "max-connections";
    /// RabbitMQ's name of the queue limit.
    pub const QUEUES: &'static str = "max-queues";

    /// The vhost definition record carrying these limits.
    pub fn record(&self) -> FieldTable {
        let mut t = FieldTable::new();
        if let Some(n) = self.max_connections {
            t.insert(s(Self::CONNECTIONS), FieldValue::I64(n as i64));
        }
        if let Some(n) = self.max_queues {
            t.insert(s(Self::QUEUES), FieldValue::I64(n as i64));
        }
        t
    }

    /// Limits from a vhost definition record.
    pub fn from_record(t: &FieldTable) -> VhostLimits {
        let get = |k: &str| {
            t.get(k)
                .and_then(FieldValue::as_i64)
                .and_then(|n| usize::try_from(n).ok())
        };
        VhostLimits {
            max_connections: get(Self::CONNECTIONS),
            max_queues: get(Self::QUEUES),
        }
    }
}

fn s(v: &'static str) -> ShortStr {
    ShortStr::from_static(v)
}

fn field_str(t: &FieldTable, k: &str) -> Option<ShortStr> {
    t.get(k)
        .and_then(FieldValue::as_str)
        .and_then(|v| ShortStr::try_from(v).ok())
}

fn field_bool(t: &FieldTable, k: &str) -> bool {
    matches!(t.get(k), Some(FieldValue::Bool(true)))
}

fn field_table(t: &FieldTable, k: &str) -> FieldTable {
    match t.get(k) {
        Some(FieldValue::Table(v)) => v.clone(),
        _ => FieldTable::new(),
    }
}

fn exchange_record(def: &ExchangeDef) -> FieldTable {
    [
        (s("name"), FieldValue::from(def.name.as_str())),
        (s("type"), FieldValue::from(def.kind.as_str())),
        (s("durable"), FieldValue::Bool(def.durable)),
        (s("auto_delete"), FieldValue::Bool(def.auto_delete)),
        (s("internal"), FieldValue::Bool(def.internal)),
        (s("arguments"), FieldValue::Table(def.arguments.clone())),
    ]
    .into_iter()
    .collect()
}

fn binding_key(vhost: &str, b: &BindingDef) -> Bytes {
    let (kind, dest) = match &b.destination {
        Destination::Queue(q) => (&b"q"[..], q),
        Destination::Exchange(x) => (&b"e"[..], x),
    };
    let mut args = BytesMut::new();
    if b.arguments.encode(&mut args).is_err() {
        args.clear();
    }
    let mut rk = BytesMut::new();
    rk.put_slice(b.routing_key.as_bytes());
    scoped_name(
        vhost,
        &[b.source.as_bytes(), kind, dest.as_bytes(), &rk, &args],
    )
}

fn binding_record(b: &BindingDef) -> FieldTable {
    let (kind, dest) = match &b.destination {
        Destination::Queue(q) => ("queue", q),
        Destination::Exchange(x) => ("exchange", x),
    };
    [
        (s("source"), FieldValue::from(b.source.as_str())),
        (s("destination"), FieldValue::from(dest.as_str())),
        (s("destination_type"), FieldValue::from(kind)),
        (s("routing_key"), FieldValue::from(b.routing_key.as_str())),
        (s("arguments"), FieldValue::Table(b.arguments.clone())),
    ]
    .into_iter()
    .collect()
}

impl Vhost {
    /// An empty vhost with the system exchanges.
    pub fn new(name: ShortStr) -> Vhost {
        Vhost {
            router: RwLock::new(Router::new(name.clone())),
            name,
            queues: DashMap::new(),
            by_id: DashMap::new(),
            closed: tokio_util::sync::CancellationToken::new(),
            connections: std::sync::atomic::AtomicUsize::new(0),
            limits: parking_lot::Mutex::new(VhostLimits::default()),
            policies: RwLock::new(Vec::new()),
            tracer: Arc::default(),
        }
    }

    /// Puts the arguments in effect for `q` — its own merged with the policy
    /// that applies to it, if any — and records which policy that is.
    pub fn apply_policy(&self, broker: &Arc<Broker>, q: &QueueHandle) {
        let mut fx = Effects::default();
        {
            // Policies are held until the queue has its arguments, so that
            // two policy changes cannot apply out of order (lock order:
            // policies, then the queue's state).
            let policies = self.policies.read();
            let policy = crate::policy::for_queue(&policies, &q.name);
            let merged = policy.map(|p| p.merge_into(&q.arguments));
            let own = || QueueArgs::parse(&q.arguments, &q.name, &self.name).unwrap_or_default();
            let (args, name) = match merged.map(|m| QueueArgs::parse(&m, &q.name, &self.name)) {
                Some(Ok(args)) => (args, policy.map(|p| p.name.clone())),
                Some(Err(e)) => {
                    tracing::warn!(queue = %q.name, error = %e, "policy not applicable; the queue's own arguments apply");
                    (own(), None)
                }
                None => (own(), None),
            };
            q.set_consumer_timeout(args.consumer_timeout);
            let mut st = q.state.lock();
            if st.deleted {
                return;
            }
            st.queue.set_effective_args(args, &mut fx);
            st.dispatch(q, &broker.store, &mut fx);
            *q.policy.lock() = name;
        }
        q.wake.notify_one();
        self.apply(broker, &mut fx);
    }

    /// Re-applies policies to every queue and exchange (a policy changed).
    pub fn apply_policies(&self, broker: &Arc<Broker>) {
        for q in self.queues() {
            self.apply_policy(broker, &q);
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

    /// Refuses access to another connection's exclusive queue (405).
    pub fn check_exclusive(&self, q: &QueueHandle, connection: u64) -> Result<(), AmqpError> {
        match q.exclusive_owner {
            Some(owner) if owner != connection => Err(self.locked(q)),
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
            Err(self.locked(q))
        }
    }

    fn locked(&self, q: &QueueHandle) -> AmqpError {
        AmqpError::resource_locked(format!(
            "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
            q.name, self.name
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

    fn persist(&self, broker: &Arc<Broker>, writes: Vec<Write>) {
        broker.store.submit(writes);
    }

    /// Persists the removal of whatever `removed` lists that was durable.
    /// Returns whether anything durable was removed (then the caller waits for
    /// the commit point before answering).
    fn persist_removed(&self, broker: &Arc<Broker>, removed: &Removed) -> bool {
        let mut writes = Vec::new();
        for b in &removed.bindings {
            writes.push(Write::DeleteDefinition {
                kind: DefKind::Binding,
                key: binding_key(&self.name, b),
            });
        }
        for x in removed.exchanges.iter().filter(|x| x.durable) {
            writes.push(Write::DeleteDefinition {
                kind: DefKind::Exchange,
                key: scoped_name(&self.name, &[x.name.as_bytes()]),
            });
        }
        if writes.is_empty() {
            return false;
        }
        self.persist(broker, writes);
        true
    }

    /// `exchange.declare`.
    pub async fn declare_exchange(
        &self,
        broker: &Arc<Broker>,
        decl: ExchangeDeclare<'_>,
        passive: bool,
    ) -> Result<(), AmqpError> {
        let created = self.router.write().declare_exchange(decl, passive)?;
        if created && !self.policies.read().is_empty() {
            self.apply_exchange_policies();
        }
        if created && decl.durable {
            if let Some(def) = self.router.read().exchange(decl.name) {
                self.persist(
                    broker,
                    vec![Write::PutDefinition {
                        kind: DefKind::Exchange,
                        key: scoped_name(&self.name, &[def.name.as_bytes()]),
                        value: exchange_record(def),
                    }],
                );
            }
            broker.store.commit().await?;
        }
        Ok(())
    }

    /// Deletes every exchange the vhost's clients declared (vhost deletion).
    pub fn delete_exchanges(&self, broker: &Arc<Broker>) {
        let names: Vec<ShortStr> = self
            .router
            .read()
            .exchanges()
            .filter(|x| !x.name.starts_with("amq."))
            .map(|x| x.name.clone())
            .collect();
        for name in names {
            if let Ok(removed) = self.router.write().delete_exchange(&name, false) {
                self.persist_removed(broker, &removed);
            }
        }
    }

    /// `exchange.delete`.
    pub async fn delete_exchange(
        &self,
        broker: &Arc<Broker>,
        name: &str,
        if_unused: bool,
    ) -> Result<(), AmqpError> {
        let removed = self.router.write().delete_exchange(name, if_unused)?;
        if self.persist_removed(broker, &removed) {
            broker.store.commit().await?;
        }
        Ok(())
    }

    fn is_durable_binding(&self, b: &BindingDef) -> bool {
        let router = self.router.read();
        let source = router.exchange(&b.source).is_some_and(|x| x.durable);
        let dest = match &b.destination {
            Destination::Queue(q) => self.find_queue(q).is_some_and(|q| q.durable),
            Destination::Exchange(x) => router.exchange(x).is_some_and(|x| x.durable),
        };
        source && dest
    }

    /// `queue.bind` / `exchange.bind`.
    pub async fn bind(&self, broker: &Arc<Broker>, b: &BindingDef) -> Result<(), AmqpError> {
        let added = self.router.write().bind(b)?;
        if added && self.is_durable_binding(b) {
            self.persist(
                broker,
                vec![Write::PutDefinition {
                    kind: DefKind::Binding,
                    key: binding_key(&self.name, b),
                    value: binding_record(b),
                }],
            );
            broker.store.commit().await?;
        }
        Ok(())
    }

    /// `queue.unbind` / `exchange.unbind`.
    pub async fn unbind(&self, broker: &Arc<Broker>, b: &BindingDef) -> Result<(), AmqpError> {
        let removed = self.router.write().unbind(b)?;
        if self.persist_removed(broker, &removed) {
            broker.store.commit().await?;
        }
        Ok(())
    }

    /// Creates a queue (the caller checked it does not exist).
    #[allow(clippy::too_many_arguments)]
    pub async fn declare_queue(
        self: &Arc<Self>,
        broker: &Arc<Broker>,
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
        let id = broker.next_queue_id();
        let mut queue = Queue::new(id, name.clone(), durable, args, arguments.clone(), now_ms());
        queue.set_memory_budget(broker.config.queue_memory_budget);
        queue.set_spill_dir(broker.spill_dir.clone());
        let handle = QueueHandle::new(
            queue,
            auto_delete,
            exclusive_owner,
            broker.config.queue_flow_limit,
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
        if !self.policies.read().is_empty() {
            self.apply_policy(broker, &handle);
        }
        if durable {
            let record: FieldTable = [
                (s("name"), FieldValue::from(name.as_str())),
                (s("id"), FieldValue::I64(id as i64)),
                (s("auto_delete"), FieldValue::Bool(auto_delete)),
                (s("arguments"), FieldValue::Table(arguments)),
            ]
            .into_iter()
            .collect();
            self.persist(
                broker,
                vec![Write::PutDefinition {
                    kind: DefKind::Queue,
                    key: scoped_name(&self.name, &[name.as_bytes()]),
                    value: record,
                }],
            );
            broker.store.commit().await?;
        }
        crate::broker::spawn_housekeeping(broker, self.clone(), handle.clone());
        Ok(handle)
    }

    /// Declares a queue as the management API and definitions import do
    /// (never exclusive): an existing queue must be equivalent (RabbitMQ's
    /// 406 otherwise). Returns whether it was created.
    pub async fn declare_or_check_queue(
        self: &Arc<Self>,
        broker: &Arc<Broker>,
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
            crate::channel::check_equivalent(&existing, &m, &self.name)?;
            return Ok(false);
        }
        let args = QueueArgs::parse(&m.arguments, &m.queue, &self.name)?;
        args.check_properties(durable, false, auto_delete, &m.queue, &self.name)?;
        self.declare_queue(
            broker,
            m.queue,
            durable,
            auto_delete,
            None,
            args,
            m.arguments,
        )
        .await?;
        Ok(true)
    }

    /// Deletes a queue: its messages, bindings, consumers (who are told, if
    /// they asked to be) and durable record. Returns its ready-message count.
    ///
    /// With `only_if_unused` (auto-delete, `x-expires`), a queue that has
    /// gained a consumer meanwhile is kept: the check and the deletion happen
    /// under the queue's lock.
    pub async fn delete_queue(
        &self,
        broker: &Arc<Broker>,
        q: &Arc<QueueHandle>,
        only_if_unused: bool,
    ) -> Result<u64, AmqpError> {
        let mut fx = Effects::default();
        let (count, consumers) = {
            let mut st = q.state.lock();
            if st.deleted || (only_if_unused && !st.consumers.is_empty()) {
                return Ok(0);
            }
            st.deleted = true;
            (st.queue.delete(&mut fx), std::mem::take(&mut st.consumers))
        };
        q.wake.notify_one();
        // Its publishers must not wait for a queue that is gone.
        q.flow.lower();
        for c in &consumers {
            notify_cancel(c);
        }
        self.queues.remove(&q.name);
        self.by_id.remove(&q.id);
        let removed = self.router.write().remove_queue(QueueId(q.id));
        self.persist_removed(broker, &removed);
        if q.durable {
            fx.writes.push(Write::DeleteDefinition {
                kind: DefKind::Queue,
                key: scoped_name(&self.name, &[q.name.as_bytes()]),
            });
        }
        self.apply(broker, &mut fx);
        if q.durable {
            broker.store.commit().await?;
        }
        tracing::info!(queue = %q.name, vhost = %self.name, "queue deleted");
        Ok(count)
    }

    /// `queue.purge`.
    pub fn purge(&self, broker: &Arc<Broker>, q: &QueueHandle) -> u64 {
        let mut fx = Effects::default();
        let n = q.state.lock().queue.purge(&mut fx);
        self.apply(broker, &mut fx);
        n
    }

    /// Removes a consumer; an auto-delete queue goes with its last one.
    pub fn cancel_consumer(&self, broker: &Arc<Broker>, q: &Arc<QueueHandle>, tag: &ShortStr) {
        let now_unused = {
            let mut st = q.state.lock();
            let before = st.consumers.len();
            st.consumers.retain(|c| c.tag != *tag);
            st.queue.touch(now_ms());
            before > 0 && st.consumers.is_empty()
        };
        q.wake.notify_one();
        if now_unused && q.auto_delete {
            let (q, broker2) = (q.clone(), broker.clone());
            let name = self.name.clone();
            broker.tracker.spawn(async move {
                if let Some(v) = broker2.vhost(&name) {
                    if let Err(e) = v.delete_queue(&broker2, &q, true).await {
                        tracing::warn!(error = %e, "auto-delete failed");
                    }
                }
            });
        }
    }

    /// Settles deliveries (ack, requeue, reject), then lets the queues deliver
    /// again (credit came back).
    pub fn settle(&self, broker: &Arc<Broker>, unacked: Vec<Unacked>, how: Settle) {
        self.settle_then(broker, unacked, how, true);
    }

    /// Settles deliveries; lets their queues deliver again only if `dispatch`
    /// (a channel with a channel-wide prefetch dispatches its own queues in
    /// turn instead, see [`Vhost::dispatch_channel`]).
    pub fn settle_then(
        &self,
        broker: &Arc<Broker>,
        unacked: Vec<Unacked>,
        how: Settle,
        dispatch: bool,
    ) {
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
            if let Some(q) = self.queue_by_id(qid) {
                let mut st = q.state.lock();
                if how == Settle::Ack {
                    broker.metrics.acknowledged.inc_by((j - i) as u64);
                    q.stats
                        .acked
                        .fetch_add((j - i) as u64, std::sync::atomic::Ordering::Relaxed);
                }
                for u in &unacked[i..j] {
                    if let Some(c) = &u.consumer_unacked {
                        c.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    match how {
                        Settle::Ack => st.queue.ack(u.seq, &mut fx),
                        Settle::Requeue => st.queue.requeue(u.seq, &mut fx),
                        Settle::Reject => st.queue.reject(u.seq, &mut fx),
                    };
                }
                if dispatch {
                    st.dispatch(&q, &broker.store, &mut fx);
                }
                drop(st);
                q.wake.notify_one();
            }
            i = j;
        }
        self.apply(broker, &mut fx);
    }

    /// Lets one queue deliver to its consumers.
    pub fn dispatch(&self, broker: &Arc<Broker>, q: &QueueHandle) {
        let mut fx = Effects::default();
        q.state.lock().dispatch(q, &broker.store, &mut fx);
        self.apply(broker, &mut fx);
    }

    /// Lets every queue a channel consumes from deliver (credit came back),
    /// starting with the consumer at `start` (mod their number): callers
    /// rotate it, so that credit shared by the channel (a global prefetch,
    /// room in the connection's outbox) goes to each queue in turn rather
    /// than always to the first (RabbitMQ's limiter varies the order too).
    pub fn dispatch_channel(
        &self,
        broker: &Arc<Broker>,
        consumers: &[(ShortStr, Arc<QueueHandle>)],
        start: usize,
    ) {
        let n = consumers.len();
        for i in 0..n {
            if let Some((_, q)) = consumers.get((start + i) % n) {
                self.dispatch(broker, q);
            }
        }
    }

    /// Applies a queue operation's effects: trace copies and dead letters
    /// are routed and published, then writes submitted, then references
    /// released.
    pub fn apply(&self, broker: &Arc<Broker>, fx: &mut Effects) {
        if self.tracer.is_on() {
            self.publish_traces(broker, fx);
        }
        // Dead letters can produce more (a full DLX queue dropping its head):
        // iterate until quiet, bounded so a pathological setup cannot spin.
        for _ in 0..16 {
            let requests = std::mem::take(&mut fx.dead_letters);
            if requests.is_empty() {
                break;
            }
            for r in &requests {
                broker.metrics.dead_letter(r.reason, true);
            }
            for r in requests {
                let Some(original) = load(&r.message, &broker.store) else {
                    continue;
                };
                let dl = r.build(&original, now_ms());
                let headers = dl.header.properties.headers().ok().flatten();
                let mut routed = exchange::Routed::default();
                let mut targets = Vec::new();
                for key in &dl.routing_keys {
                    // A missing dead-letter exchange drops the message (RabbitMQ).
                    if self
                        .router
                        .read()
                        .route_dead_letter(&dl.exchange, key, headers.as_ref(), &mut routed)
                        .is_ok()
                    {
                        targets.extend_from_slice(routed.queues());
                    }
                }
                targets.sort_unstable();
                targets.dedup();
                let message = Message::new(
                    broker.store.next_message_id(),
                    dl.exchange.clone(),
                    dl.routing_keys.first().cloned().unwrap_or_default(),
                    dl.header,
                    dl.body,
                );
                for qid in targets {
                    let Some(q) = self.queue_by_id(qid.0) else {
                        continue;
                    };
                    if is_cycle(headers.as_ref(), &q.name) {
                        continue;
                    }
                    let mut st = q.state.lock();
                    if st.deleted {
                        continue;
                    }
                    st.publish(&q, &message, &broker.store, fx);
                    drop(st);
                    q.wake.notify_one();
                }
            }
        }
        fx.dead_letters.clear();
        // Deliveries of dead letters made trace copies too.
        if self.tracer.is_on() {
            self.publish_traces(broker, fx);
        }
        for reason in fx.discarded.drain(..) {
            broker.metrics.dead_letter(reason, false);
        }
        if !fx.writes.is_empty() {
            broker.store.submit(fx.writes.drain(..));
        }
        for id in fx.releases.drain(..) {
            broker.store.release(id);
        }
    }

    /// Routes the firehose's pending copies through `amq.rabbitmq.trace`
    /// (copies of its own messages are never made, so this ends).
    fn publish_traces(&self, broker: &Arc<Broker>, fx: &mut Effects) {
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
                broker.store.next_message_id(),
                exchange.clone(),
                copy.routing_key,
                copy.header,
                copy.body,
            );
            for &qid in routed.queues() {
                let Some(q) = self.queue_by_id(qid.0) else {
                    continue;
                };
                let mut st = q.state.lock();
                if st.deleted {
                    continue;
                }
                st.publish(&q, &message, &broker.store, fx);
                drop(st);
                q.wake.notify_one();
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
        broker: &Arc<Broker>,
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
            broker.store.next_message_id(),
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
        };
        for &qid in routed.queues() {
            let Some(queue) = self.queue_by_id(qid.0) else {
                continue;
            };
            let mut st = queue.state.lock();
            if st.deleted {
                continue;
            }
            let (outcome, stored) = st.publish(&queue, &out.message, &broker.store, fx);
            out.refused |= outcome == queue_store::Enqueued::Rejected;
            out.wrote |= stored;
            let congested = queue.check_flow(&st);
            drop(st);
            queue.wake.notify_one();
            if congested {
                out.congested.push(queue.flow.clone());
            }
        }
        if out.wrote && broker.store.flow().is_raised() {
            out.congested.push(broker.store.flow().clone());
        }
        broker.metrics.received.inc();
        match (out.unroutable, p.mandatory) {
            (false, _) => broker.metrics.routed.inc(),
            (true, true) => broker.metrics.unroutable_returned.inc(),
            (true, false) => broker.metrics.unroutable_dropped.inc(),
        };
        broker
            .alarms
            .note_published(out.message.size(), routed.queues().len() as u64);
        self.apply(broker, fx);
        Ok(out)
    }

    /// Rebuilds this vhost from stored definitions (at boot).
    pub fn recover(
        self: &Arc<Self>,
        broker: &Arc<Broker>,
        recovered: &mut queue_store::Recovered,
    ) -> usize {
        let prefix = scoped_name(&self.name, &[]);
        let mine = |key: &Bytes| key.starts_with(&prefix) && key.get(prefix.len()) == Some(&0);
        let defs: Vec<_> = recovered
            .definitions
            .iter()
            .filter(|(_, k, _)| mine(k))
            .cloned()
            .collect();
        for (_, _, t) in defs.iter().filter(|(k, _, _)| *k == DefKind::Policy) {
            match crate::policy::Policy::from_record(t) {
                Some(p) => self.policies.write().push(p),
                None => tracing::warn!("cannot recover a policy record; skipped"),
            }
        }
        for (_, _, t) in defs.iter().filter(|(k, _, _)| *k == DefKind::Exchange) {
            let (Some(name), Some(ty)) = (field_str(t, "name"), field_str(t, "type")) else {
                continue;
            };
            let args = field_table(t, "arguments");
            let decl = ExchangeDeclare {
                name: &name,
                kind: &ty,
                durable: true,
                auto_delete: field_bool(t, "auto_delete"),
                internal: field_bool(t, "internal"),
                arguments: &args,
            };
            if let Err(e) = self.router.write().declare_exchange(decl, false) {
                tracing::warn!(exchange = %name, error = %e, "cannot recover exchange");
            }
        }
        self.apply_exchange_policies();
        let mut queues = 0;
        for (_, _, t) in defs.iter().filter(|(k, _, _)| *k == DefKind::Queue) {
            let (Some(name), Some(FieldValue::I64(id))) = (field_str(t, "name"), t.get("id"))
            else {
                continue;
            };
            let id = *id as u64;
            let arguments = field_table(t, "arguments");
            let args = QueueArgs::parse(&arguments, &name, &self.name).unwrap_or_default();
            let entries = recovered.queues.remove(&id).unwrap_or_default();
            // Spilling is set up first, so a deep queue is rebuilt a window
            // at a time.
            let mut queue = Queue::new(id, name.clone(), true, args, arguments, now_ms());
            queue.set_memory_budget(broker.config.queue_memory_budget);
            queue.set_spill_dir(broker.spill_dir.clone());
            queue.restore(entries, recovered.clean_shutdown);
            broker.note_queue_id(id);
            let handle = QueueHandle::new(
                queue,
                field_bool(t, "auto_delete"),
                None,
                broker.config.queue_flow_limit,
                self.tracer.clone(),
            );
            self.queues.insert(name.clone(), handle.clone());
            self.by_id.insert(id, handle.clone());
            self.router.write().add_queue(name, QueueId(id));
            if !self.policies.read().is_empty() {
                self.apply_policy(broker, &handle);
            }
            crate::broker::spawn_housekeeping(broker, self.clone(), handle);
            queues += 1;
        }
        for (_, _, t) in defs.iter().filter(|(k, _, _)| *k == DefKind::Binding) {
            let (Some(source), Some(dest), Some(kind), Some(rk)) = (
                field_str(t, "source"),
                field_str(t, "destination"),
                field_str(t, "destination_type"),
                field_str(t, "routing_key"),
            ) else {
                continue;
            };
            let destination = if kind == "exchange" {
                Destination::Exchange(dest)
            } else {
                Destination::Queue(dest)
            };
            let b = BindingDef {
                source,
                destination,
                routing_key: rk,
                arguments: field_table(t, "arguments"),
            };
            if let Err(e) = self.router.write().bind(&b) {
                tracing::warn!(error = %e, "cannot recover binding");
            }
        }
        queues
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
