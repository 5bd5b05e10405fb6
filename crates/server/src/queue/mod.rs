//! A queue as the broker sees it: [`QueueHandle`] (its identity, counters,
//! flow gate and housekeeping wake-up) and [`QueueType`], the interface every
//! kind of queue implements and the channel, the vhost and the management
//! API are written against: publish, consume, cancel, get, settle (ack,
//! requeue, reject), dispatch, purge, delete, counters, housekeeping.
//! `x-queue-type` picks the implementation: `classic` (and `quorum` on a
//! node alone) is [`classic::ClassicQueue`]; in a cluster a quorum queue is
//! replicated and reached through the cluster (`peers`), not from here.
//!
//! Deliveries leave through the consumer's channel (`Consumer::channel`),
//! encoded straight into its connection's outbox. Whoever changes a queue (a
//! publisher's connection task, an ack, the housekeeping timer) calls the
//! interface, which locks, changes, dispatches and unlocks; the returned
//! [`Effects`] (store writes, dead letters) are applied outside the lock.
//! Lock order: queue → channel deliveries → outbox; nothing takes a queue
//! lock while holding a channel or outbox lock.

pub mod classic;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use amqp_codec::{
    ContentHeader, FieldTable, FieldValue, Method, ShortStr, encode_body, encode_content_header,
    encode_method,
};
use queue_store::{
    Delivery, Effects, FlowGate, Message, MessageId, MessageRef, Queue, QueueArgs, SpillIo,
    SpillIoDone, Store,
};
use tokio::sync::Notify;

use crate::error::AmqpError;

/// A consumer attached to a queue.
#[derive(Debug)]
pub struct Consumer {
    /// Consumer tag.
    pub tag: ShortStr,
    /// Where its deliveries go (the channel it consumes on).
    pub sink: Arc<dyn DeliverySink>,
    /// Deliveries are settled on sending (`no-ack`).
    pub no_ack: bool,
    /// Per-consumer prefetch (0 = unlimited).
    pub prefetch: u16,
    /// Unacknowledged deliveries to this consumer.
    pub unacked: Arc<AtomicU32>,
    /// `exclusive` flag.
    pub exclusive: bool,
    /// `x-priority` (default 0): higher-priority consumers are served first
    /// while they have credit.
    pub priority: i32,
}

impl Consumer {
    fn has_credit(&self) -> bool {
        self.no_ack
            || self.prefetch == 0
            || self.unacked.load(Ordering::Relaxed) < u32::from(self.prefetch)
    }
}

/// The policies that apply to a queue, by name, and the definition they
/// give together (RabbitMQ's `policy`, `operator_policy` and
/// `effective_policy_definition`); set by the vhost when policies change.
#[derive(Debug, Clone, Default)]
pub struct AppliedPolicies {
    /// The policy in effect.
    pub policy: Option<String>,
    /// The operator policy in effect.
    pub operator_policy: Option<String>,
    /// Both definitions merged (the lower limit where both set one).
    pub definition: serde_json::Map<String, serde_json::Value>,
}

/// A queue and its identity.
#[derive(Debug)]
pub struct QueueHandle {
    /// Storage id (also the router's queue id).
    pub id: u64,
    /// Name.
    pub name: ShortStr,
    /// Survives restarts.
    pub durable: bool,
    /// Deleted with the last consumer.
    pub auto_delete: bool,
    /// The owning connection of an exclusive queue.
    pub exclusive_owner: Option<u64>,
    /// Declare arguments.
    pub arguments: FieldTable,
    /// `x-consumer-timeout` in effect (argument or policy), ms; `u64::MAX`
    /// for none (the broker's default applies).
    consumer_timeout: std::sync::atomic::AtomicU64,
    /// The policies in effect and the definition they give.
    pub policy: parking_lot::Mutex<AppliedPolicies>,
    /// Message counters and their rates (management `message_stats`).
    pub stats: QueueStats,
    /// The queue itself (its type's state behind the interface).
    kind: Box<dyn QueueType>,
    /// Wakes the housekeeping task (expiry timer changed, queue deleted).
    pub wake: Notify,
    /// Raised while the queue's ready messages take more than `flow_limit`:
    /// connections publishing to it stop
    /// being read until it drains to half.
    pub flow: Arc<FlowGate>,
    /// The memory this queue may hold before its publishers are paused.
    pub flow_limit: u64,
    /// Its vhost's firehose.
    pub tracer: Arc<crate::trace::Tracer>,
}

/// What to do with settled deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Acknowledge.
    Ack,
    /// Return to the queue.
    Requeue,
    /// Reject without requeue (dead-letter or discard).
    Reject,
}

/// One delivery a queue hands to a consumer's sink.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// The queue it comes from.
    pub queue: &'a QueueHandle,
    /// The consumer.
    pub consumer_tag: &'a ShortStr,
    /// Its place in the queue (what settling it names).
    pub seq: u64,
    /// Delivered before.
    pub redelivered: bool,
    /// Times it was returned before (`x-delivery-count`).
    pub delivery_count: u32,
    /// The message.
    pub message: &'a Message,
    /// To be acknowledged: the consumer's count of unacknowledged deliveries
    /// (`None` for a no-ack consumer).
    pub consumer_unacked: Option<&'a Arc<AtomicU32>>,
}

/// Who consumes through a sink, for listings.
#[derive(Debug, Clone)]
pub struct SinkInfo {
    /// The consumer's tag as its client knows it, when the queue knows it
    /// under another (a consumer on another node).
    pub tag: Option<String>,
    /// The connection's name.
    pub connection_name: String,
    /// The channel number.
    pub channel: u16,
    /// The client's address.
    pub peer: std::net::SocketAddr,
    /// The connection's user.
    pub user: String,
}

/// Where a consumer's deliveries go: the consuming channel provides it. The
/// local sink (`ChannelShared`) tags a delivery and encodes it straight into
/// its connection's outbox; a remote one will forward it to another node.
pub trait DeliverySink: Send + Sync + std::fmt::Debug {
    /// Whether it can take a delivery now (channel-wide prefetch, room in
    /// the outbox, not closed).
    fn can_deliver(&self) -> bool;
    /// Takes one delivery.
    fn deliver(&self, out: Outgoing<'_>);
    /// The broker cancelled this consumer (its queue is gone).
    fn cancelled_by_broker(&self, consumer_tag: &ShortStr);
    /// Who it is, for listings.
    fn describe(&self) -> SinkInfo;
}

/// A queue's counts at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounters {
    /// Ready messages.
    pub ready: u64,
    /// Delivered, not yet acknowledged.
    pub unacked: u64,
    /// Body octets of the ready messages.
    pub ready_bytes: u64,
    /// Body octets of the unacknowledged ones.
    pub unacked_bytes: u64,
    /// Consumers.
    pub consumers: usize,
    /// Memory the queue accounts for.
    pub memory: u64,
    /// Ready messages whose queue entries are spilled to disk.
    pub spilled: u64,
}

/// What a publish into one queue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Refused (`x-overflow` reject-publish): nack it.
    pub refused: bool,
    /// Written to the store: a confirm waits for the commit.
    pub wrote: bool,
    /// The queue is over its flow limit: the publisher should pause.
    pub congested: bool,
}

/// Why a consumer was not attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumeRefused {
    /// The queue is deleted.
    Deleted,
    /// An exclusive consumer holds it, or an exclusive one was asked for
    /// while others consume.
    InExclusiveUse,
}

/// What every kind of queue does. Methods that deliver take the handle (its
/// id, counters, flow gate, firehose) and the store (paged bodies, writes).
pub trait QueueType: Send + Sync + std::fmt::Debug {
    /// Its `x-queue-type` as listed (`classic`).
    fn type_name(&self) -> &'static str;
    /// Counts now.
    fn counters(&self) -> QueueCounters;
    /// Renews its `x-expires` lease (a declare); `None` if it is deleted.
    fn touch(&self) -> Option<QueueCounters>;
    /// Enqueues and delivers; `None` if it is deleted.
    fn publish(
        &self,
        q: &QueueHandle,
        message: &Arc<Message>,
        store: &Store,
        fx: &mut Effects,
    ) -> Option<Published>;
    /// Attaches a consumer; `accepted` runs first, under the queue's lock
    /// (consume-ok precedes every delivery).
    fn consume(&self, consumer: Consumer, accepted: &mut dyn FnMut())
    -> Result<(), ConsumeRefused>;
    /// Detaches a consumer; whether that left the queue without consumers.
    fn cancel(&self, tag: &ShortStr) -> bool;
    /// Detaches every consumer (the queue is handed over to another type
    /// of queue): they are to be told.
    fn take_consumers(&self) -> Vec<Consumer>;
    /// Looks at each consumer (listings).
    fn for_each_consumer(&self, f: &mut dyn FnMut(&Consumer));
    /// Takes one message, to be acknowledged if `ack`.
    fn get(&self, q: &QueueHandle, ack: bool, fx: &mut Effects) -> Option<Delivery>;
    /// Settles deliveries by sequence number; delivers again if `dispatch`.
    fn settle(
        &self,
        q: &QueueHandle,
        how: Settle,
        seqs: &mut dyn Iterator<Item = u64>,
        dispatch: bool,
        fx: &mut Effects,
    );
    /// Delivers to consumers with credit.
    fn dispatch(&self, q: &QueueHandle, fx: &mut Effects);
    /// Drops the ready messages; how many.
    fn purge(&self, fx: &mut Effects) -> u64;
    /// Marks it deleted (unless `only_if_unused` and it has consumers):
    /// its ready count and its consumers, to be told.
    fn delete(&self, only_if_unused: bool, fx: &mut Effects) -> Option<(u64, Vec<Consumer>)>;
    /// Marks it deleted if it holds no message, ready or delivered, in one
    /// step with its publishes: a message published before is still in it
    /// (false), one after is refused. A classic queue whose messages moved
    /// into its replicated successor goes so (`vhost/mirroring.rs`).
    /// Whether it is deleted.
    fn delete_if_drained(&self, fx: &mut Effects) -> bool;
    /// The fraction of the time since the last call (the monitor's
    /// sampling period) during which a consumer could take a message at
    /// once: RabbitMQ's `consumer_utilisation`.
    fn take_utilisation(&self) -> f64;
    /// Applies the arguments in effect; `false` if deleted.
    fn set_effective_args(&self, q: &QueueHandle, args: QueueArgs, fx: &mut Effects) -> bool;
    /// The next TTL expiry and `x-expires` deadline; `None` once deleted.
    fn deadlines(&self) -> Option<(Option<u64>, Option<u64>)>;
    /// Whether it has had no consumer since its `x-expires` deadline.
    fn unused_since_deadline(&self, now: u64) -> bool;
    /// Expires what is due and delivers again.
    fn expire(&self, q: &QueueHandle, now: u64, fx: &mut Effects);
    /// Memory it accounts for, lowering its flow gate if it drained.
    fn memory_in_use(&self, q: &QueueHandle) -> u64;
    /// The paged-out bodies it stopped delivering at, to be loaded off the
    /// runtime's workers and handed back through [`QueueType::page_in`]
    /// (empty unless it asked, by waking its housekeeping task).
    fn wanted_page_in(&self) -> Vec<MessageId>;
    /// The spill-file I/O it asked for (by waking its housekeeping task),
    /// to run off its lock and the runtime's workers and hand back through
    /// [`QueueType::spill_io_done`].
    fn wanted_spill_io(&self) -> Option<SpillIo>;
    /// Takes back what its spill I/O did and delivers again.
    fn spill_io_done(&self, q: &QueueHandle, done: SpillIoDone, fx: &mut Effects);
    /// Takes back loaded bodies (and the ids that could not be loaded) and
    /// delivers again.
    fn page_in(
        &self,
        q: &QueueHandle,
        loaded: Vec<Arc<Message>>,
        failed: Vec<MessageId>,
        fx: &mut Effects,
    );
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl QueueHandle {
    /// Wraps a queue.
    pub fn new(
        queue: Queue,
        auto_delete: bool,
        exclusive_owner: Option<u64>,
        flow_limit: u64,
        tracer: Arc<crate::trace::Tracer>,
    ) -> Arc<QueueHandle> {
        Arc::new(QueueHandle {
            id: queue.id(),
            name: queue.name().clone(),
            durable: queue.is_durable(),
            auto_delete,
            exclusive_owner,
            arguments: queue.arguments().clone(),
            consumer_timeout: std::sync::atomic::AtomicU64::new(
                queue.args().consumer_timeout.unwrap_or(u64::MAX),
            ),
            policy: parking_lot::Mutex::default(),
            stats: QueueStats::default(),
            kind: Box::new(classic::ClassicQueue::new(queue)),
            wake: Notify::new(),
            flow: Arc::default(),
            flow_limit,
            tracer,
        })
    }

    /// The consumer timeout in effect (ms), if the queue sets one.
    pub fn consumer_timeout(&self) -> Option<u64> {
        match self.consumer_timeout.load(Ordering::Relaxed) {
            u64::MAX => None,
            t => Some(t),
        }
    }

    /// Sets the consumer timeout in effect (a policy changed).
    pub fn set_consumer_timeout(&self, ms: Option<u64>) {
        self.consumer_timeout
            .store(ms.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// After a publish into this queue: raises its flow gate if the queue is
    /// over its limit. Returns whether the publisher must pause.
    pub fn check_flow(&self, ready_memory: u64) -> bool {
        if self.flow_limit == 0 {
            return false;
        }
        if ready_memory > self.flow_limit {
            if self.flow.raise() {
                tracing::info!(queue = %self.name, limit = self.flow_limit, "queue over its flow limit; pausing its publishers");
            }
            true
        } else {
            self.flow.is_raised()
        }
    }

    /// Lowers the flow gate once the queue has drained to half its limit.
    pub fn relieve_flow(&self, ready_memory: u64) {
        if self.flow.is_raised() && ready_memory <= self.flow_limit / 2 && self.flow.lower() {
            tracing::info!(queue = %self.name, "queue drained; its publishers resume");
        }
    }

    /// The queue's interface.
    pub fn kind(&self) -> &dyn QueueType {
        &*self.kind
    }

    /// Counters (listings, metrics).
    pub fn counters(&self) -> QueueCounters {
        self.kind.counters()
    }

    /// Samples the queue's rates (the monitor, every 5 s): its counters'
    /// and depth's, and its consumer utilisation since the last sample.
    pub fn sample_stats(&self) {
        let c = self.counters();
        let utilisation = self.kind.take_utilisation();
        self.stats
            .sample([c.ready + c.unacked, c.ready, c.unacked], utilisation);
    }

    /// The 406 for redeclaring it with different properties or arguments
    /// (`queue.declare`, the management API, definitions import).
    pub fn check_equivalent(
        &self,
        m: &amqp_codec::methods::QueueDeclare,
        vhost: &str,
    ) -> Result<(), AmqpError> {
        check_equivalent(
            &self.name,
            vhost,
            (self.durable, self.auto_delete, &self.arguments),
            m,
        )
    }

    /// Enqueues a message and delivers what it can; `None` if the queue is
    /// deleted.
    pub fn publish(
        &self,
        message: &Arc<Message>,
        store: &Store,
        fx: &mut Effects,
    ) -> Option<Published> {
        self.kind.publish(self, message, store, fx)
    }

    /// Takes one message (`basic.get`, the management API's get).
    pub fn get(&self, ack: bool, fx: &mut Effects) -> Option<Delivery> {
        self.kind.get(self, ack, fx)
    }

    /// Settles deliveries by sequence number; delivers again if `dispatch`.
    pub fn settle(
        &self,
        how: Settle,
        seqs: &mut dyn Iterator<Item = u64>,
        dispatch: bool,
        fx: &mut Effects,
    ) {
        self.kind.settle(self, how, seqs, dispatch, fx);
    }

    /// Lets the queue deliver to its consumers.
    pub fn dispatch(&self, fx: &mut Effects) {
        self.kind.dispatch(self, fx);
    }

    /// Applies the arguments in effect (a policy changed); `false` if the
    /// queue is deleted.
    pub fn set_effective_args(&self, args: QueueArgs, fx: &mut Effects) -> bool {
        self.kind.set_effective_args(self, args, fx)
    }

    /// Expires messages whose TTL ran out and delivers again.
    pub fn expire(&self, now: u64, fx: &mut Effects) {
        self.kind.expire(self, now, fx);
    }

    /// Loads the paged bodies the queue stopped at, off the runtime's
    /// workers and off its lock, and delivers again. Returns whether it
    /// wanted any (the housekeeping task calls it when woken).
    pub async fn page_in(&self, store: &Arc<Store>, fx: &mut Effects) -> bool {
        let wanted = self.kind.wanted_page_in();
        if wanted.is_empty() {
            return false;
        }
        let (loaded, failed) = load_all_off_worker(wanted, store).await;
        // A backlog coming back from disk: its deliveries gather for the
        // consumers' writers (one write per batch, not one per delivery;
        // see `outbox.rs`).
        let cork = crate::outbox::Cork::for_writers();
        self.kind.page_in(self, loaded, failed, fx);
        drop(cork);
        true
    }

    /// Runs the spill-file I/O the queue asked for (writing chunks of
    /// entries behind its window, reading the next one back) on the
    /// blocking pool, and delivers again. Returns whether it wanted any (the
    /// housekeeping task calls it when woken).
    pub async fn spill_io(&self, fx: &mut Effects) -> bool {
        let Some(io) = self.kind.wanted_spill_io() else {
            return false;
        };
        match tokio::task::spawn_blocking(move || io.run()).await {
            Ok(done) => {
                // (As `page_in`: a backlog's deliveries, for the writers.)
                let cork = crate::outbox::Cork::for_writers();
                self.kind.spill_io_done(self, done, fx);
                drop(cork);
            }
            Err(e) => tracing::error!(queue = %self.name, error = %e, "spill I/O did not finish"),
        }
        true
    }

    /// Memory the queue accounts for (and its flow gate lowered if it
    /// drained).
    pub fn memory_in_use(&self) -> u64 {
        self.kind.memory_in_use(self)
    }
}

/// One unacknowledged delivery: which queue's message, for which consumer
/// (kept by the channel that received it until it is settled).
#[derive(Debug, Clone)]
pub struct Unacked {
    /// Queue id.
    pub queue: u64,
    /// The queue's handle for the message.
    pub seq: u64,
    /// The consumer's unacked counter (none for `basic.get`).
    pub consumer_unacked: Option<Arc<AtomicU32>>,
    /// The consumer's tag (none for `basic.get`).
    pub consumer: Option<ShortStr>,
    /// When it was delivered (ms since the epoch), for the consumer timeout.
    pub delivered_at: u64,
}

/// A queue's message counters, and their rates over the last sampling
/// period (RabbitMQ's `message_stats`: publish, deliver_get, ack); also how
/// its depth changed (RabbitMQ's `messages_details` and the like) and since
/// when nothing happened (`idle_since`).
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Messages enqueued.
    pub published: AtomicU64,
    /// Acknowledgements.
    pub acked: AtomicU64,
    /// Deliveries by kind, as RabbitMQ splits them ([`DELIVERY_KINDS`]);
    /// the first four add up to all deliveries (`deliver_get`).
    pub kinds: crate::rates::RatedCounters<6>,
    last: parking_lot::Mutex<Option<StatsSample>>,
}

/// RabbitMQ's names for a queue's deliveries by kind, in the order
/// [`QueueStats::kinds`] counts them.
pub const DELIVERY_KINDS: [&str; 6] = [
    "deliver",
    "deliver_no_ack",
    "get",
    "get_no_ack",
    "get_empty",
    "redeliver",
];

#[derive(Debug, Clone, Copy)]
struct StatsSample {
    at: std::time::Instant,
    counts: [u64; 3],
    rates: [f64; 3],
    /// Messages, ready, unacknowledged at the sample.
    depth: [u64; 3],
    /// Their change per second since the previous sample.
    depth_rates: [f64; 3],
    /// When the counters last moved (ms since the epoch), as last seen.
    active_at: u64,
    /// The fraction of the period a consumer could take a message at once.
    utilisation: f64,
}

impl QueueStats {
    fn counts(&self) -> [u64; 3] {
        [
            self.published.load(Ordering::Relaxed),
            (0..4).map(|i| self.kinds.get(i)).sum(),
            self.acked.load(Ordering::Relaxed),
        ]
    }

    /// Counts a delivery: by `basic.get` or to a consumer, needing an ack
    /// or not, redelivered or not.
    pub fn note_delivery(&self, get: bool, ack: bool, redelivered: bool) {
        let kind = match (get, ack) {
            (false, true) => 0,
            (false, false) => 1,
            (true, true) => 2,
            (true, false) => 3,
        };
        self.kinds.add(kind, 1);
        if redelivered {
            self.kinds.add(5, 1);
        }
    }

    /// Counts a `basic.get` that found the queue empty.
    pub fn note_get_empty(&self) {
        self.kinds.add(4, 1);
    }

    /// Takes a sample, with the queue's `depth` (messages, ready,
    /// unacknowledged) now and its consumer `utilisation` over the period:
    /// rates become the change since the previous one per second. Called
    /// periodically (every 5 s) by the broker's monitor.
    pub fn sample(&self, depth: [u64; 3], utilisation: f64) {
        let now = std::time::Instant::now();
        self.kinds.sample();
        let counts = self.counts();
        let mut last = self.last.lock();
        let (rates, depth_rates, active_at) = match *last {
            Some(prev) => {
                let secs = now.duration_since(prev.at).as_secs_f64().max(1e-3);
                let rates = [0, 1, 2].map(|i| {
                    counts[i].saturating_sub(prev.counts.get(i).copied().unwrap_or(0)) as f64 / secs
                });
                let depth_rates = [0, 1, 2].map(|i| {
                    let (now, then) = (
                        depth[i] as f64,
                        prev.depth.get(i).copied().unwrap_or(0) as f64,
                    );
                    (now - then) / secs
                });
                let moved = counts != prev.counts;
                (
                    rates,
                    depth_rates,
                    if moved { now_ms() } else { prev.active_at },
                )
            }
            None => ([0.0; 3], [0.0; 3], now_ms()),
        };
        *last = Some(StatsSample {
            at: now,
            counts,
            rates,
            depth,
            depth_rates,
            active_at,
            utilisation,
        });
    }

    /// The fraction of the last sampling period during which a consumer
    /// could take a message at once (RabbitMQ's `consumer_utilisation`).
    pub fn utilisation(&self) -> f64 {
        self.last.lock().map_or(0.0, |s| s.utilisation)
    }

    /// How the depth (messages, ready, unacknowledged) changed per second
    /// over the last sampling period.
    pub fn depth_rates(&self) -> [f64; 3] {
        self.last.lock().map_or([0.0; 3], |s| s.depth_rates)
    }

    /// Since when (ms since the epoch) the queue has been idle — nothing
    /// published, delivered or acknowledged — if it was at the last two
    /// samples; `None` while it is busy.
    pub fn idle_since(&self) -> Option<u64> {
        let last = (*self.last.lock())?;
        (last.counts == self.counts() && last.rates == [0.0; 3]).then_some(last.active_at)
    }

    /// Counts (publish, deliver_get, ack) and their last sampled rates.
    pub fn snapshot(&self) -> ([u64; 3], [f64; 3]) {
        (
            self.counts(),
            self.last.lock().map_or([0.0; 3], |s| s.rates),
        )
    }
}

pub use crate::alarm::ENTRY_OVERHEAD;

/// Estimated memory per message whose queue entry is spilled to disk: the
/// store's word for its body and that map's slack.
pub const SPILLED_ENTRY_OVERHEAD: u64 = 24;

/// Loads a message that may be paged out, reading a paged body on the
/// runtime's blocking pool (never on an async worker).
pub async fn load_off_worker(message: &MessageRef, store: &Arc<Store>) -> Option<Arc<Message>> {
    match message {
        MessageRef::Loaded(m) => Some(m.clone()),
        MessageRef::Paged(id) => {
            let (id, store) = (*id, store.clone());
            match tokio::task::spawn_blocking(move || store.load(id)).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot load paged message");
                    None
                }
                Err(e) => {
                    tracing::error!(error = %e, "paged message load did not finish");
                    None
                }
            }
        }
    }
}

/// Loads the paged bodies `ids` on the runtime's blocking pool: those
/// loaded, and the ids that could not be.
pub async fn load_all_off_worker(
    ids: Vec<MessageId>,
    store: &Arc<Store>,
) -> (Vec<Arc<Message>>, Vec<MessageId>) {
    let store = store.clone();
    let all = ids.clone();
    tokio::task::spawn_blocking(move || {
        let mut loaded = Vec::with_capacity(ids.len());
        let mut failed = Vec::new();
        for (id, result) in ids.iter().copied().zip(store.load_in_order(&ids)) {
            match result {
                Ok(Some(m)) => loaded.push(m),
                Ok(None) => failed.push(id),
                Err(e) => {
                    tracing::error!(error = %e, "cannot load paged message");
                    failed.push(id);
                }
            }
        }
        (loaded, failed)
    })
    .await
    .unwrap_or((Vec::new(), all))
}

/// The content header to deliver: with `x-delivery-count` set on redeliveries
/// of messages that were returned before (as RabbitMQ quorum queues do).
pub fn with_delivery_count(header: &ContentHeader, count: u32) -> ContentHeader {
    if count == 0 {
        return header.clone();
    }
    header.clone().with_properties(|p| {
        p.headers.get_or_insert_with(FieldTable::new).insert(
            ShortStr::from_static("x-delivery-count"),
            FieldValue::I64(i64::from(count)),
        );
    })
}

/// Encodes a content-carrying method with its header and body.
pub fn encode_content(
    buf: &mut bytes::BytesMut,
    channel: u16,
    method: &Method,
    header: &ContentHeader,
    body: &[u8],
    frame_max: u32,
) {
    let result = encode_method(buf, channel, method)
        .and_then(|()| encode_content_header(buf, channel, header))
        .and_then(|()| encode_body(buf, channel, body, frame_max));
    if let Err(e) = result {
        tracing::error!(error = %e, "cannot encode a delivery");
    }
}

/// Tells a consumer's sink that the broker cancelled it (queue deleted).
pub fn notify_cancel(consumer: &Consumer) {
    consumer.sink.cancelled_by_broker(&consumer.tag);
}

/// RabbitMQ's redeclare check: a declare of an existing queue `name` whose
/// (durable, auto-delete, arguments) are `current` must ask for the same
/// (406 naming the first difference otherwise). Used for queues on this
/// node and on others alike.
pub fn check_equivalent(
    name: &str,
    vhost: &str,
    current: (bool, bool, &amqp_codec::FieldTable),
    m: &amqp_codec::methods::QueueDeclare,
) -> Result<(), AmqpError> {
    let (durable, auto_delete, arguments) = current;
    let ineq = |arg: &str, received: String, current: String| {
        AmqpError::precondition_failed(format!(
            "inequivalent arg '{arg}' for queue '{name}' in vhost '{vhost}': received {received} but current is {current}"
        ))
    };
    if durable != m.durable {
        return Err(ineq(
            "durable",
            format!("'{}'", m.durable),
            format!("'{durable}'"),
        ));
    }
    if auto_delete != m.auto_delete {
        return Err(ineq(
            "auto_delete",
            format!("'{}'", m.auto_delete),
            format!("'{auto_delete}'"),
        ));
    }
    if let Some((arg, received, current)) =
        queue_store::args::first_difference(arguments, &m.arguments)
    {
        return Err(ineq(arg, received, current));
    }
    Ok(())
}
