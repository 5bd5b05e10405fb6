//! A queue as the broker runs it: the store's [`Queue`] state machine plus its
//! consumers, behind one short-held lock, and the dispatch loop that hands
//! ready messages to consumers with credit.
//!
//! Whoever changes a queue (a publisher's connection task, an ack, the queue's
//! housekeeping timer) locks it, makes the change, runs [`QueueState::dispatch`]
//! (which encodes deliveries straight into consumers' outboxes), unlocks, and
//! then applies the returned [`Effects`] (store writes, dead letters) outside
//! the lock. Lock order: queue → channel deliveries → outbox; nothing takes a
//! queue lock while holding a channel or outbox lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use amqp_codec::methods::{BasicCancel, BasicDeliver};
use amqp_codec::{
    ContentHeader, FieldTable, FieldValue, Method, ShortStr, encode_body, encode_content_header,
    encode_method,
};
use parking_lot::Mutex;
use queue_store::{Delivery, Effects, Enqueued, FlowGate, Message, MessageRef, Queue, Store};
use tokio::sync::Notify;

use crate::channel::{ChannelShared, Unacked};

/// A consumer attached to a queue.
#[derive(Debug)]
pub struct Consumer {
    /// Consumer tag.
    pub tag: ShortStr,
    /// The channel it consumes on.
    pub channel: Arc<ChannelShared>,
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

/// Mutable state of a queue.
#[derive(Debug)]
pub struct QueueState {
    /// Messages.
    pub queue: Queue,
    /// Consumers in registration order.
    pub consumers: Vec<Consumer>,
    next_consumer: usize,
    /// Set once the queue is deleted; later operations are refused.
    pub deleted: bool,
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
    /// The policy in effect, by name.
    pub policy: parking_lot::Mutex<Option<String>>,
    /// Message counters and their rates (management `message_stats`).
    pub stats: QueueStats,
    /// State.
    pub state: Mutex<QueueState>,
    /// Wakes the housekeeping task (expiry timer changed, queue deleted).
    pub wake: Notify,
    /// Raised while the queue holds more than `flow_limit` (see
    /// [`QueueState::memory_in_use`]): connections publishing to it stop
    /// being read until it drains to half.
    pub flow: Arc<FlowGate>,
    /// The memory this queue may hold before its publishers are paused.
    pub flow_limit: u64,
    /// Its vhost's firehose.
    pub tracer: Arc<crate::trace::Tracer>,
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
            policy: parking_lot::Mutex::new(None),
            stats: QueueStats::default(),
            state: Mutex::new(QueueState {
                queue,
                consumers: Vec::new(),
                next_consumer: 0,
                deleted: false,
            }),
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
    pub fn check_flow(&self, st: &QueueState) -> bool {
        if self.flow_limit == 0 {
            return false;
        }
        if st.ready_memory() > self.flow_limit {
            if self.flow.raise() {
                tracing::info!(queue = %self.name, limit = self.flow_limit, "queue over its flow limit; pausing its publishers");
            }
            true
        } else {
            self.flow.is_raised()
        }
    }

    /// Lowers the flow gate once the queue has drained to half its limit.
    pub fn relieve_flow(&self, st: &QueueState) {
        if self.flow.is_raised() && st.ready_memory() <= self.flow_limit / 2 && self.flow.lower() {
            tracing::info!(queue = %self.name, "queue drained; its publishers resume");
        }
    }
}

/// A queue's message counters, and their rates over the last sampling
/// period (RabbitMQ's `message_stats`: publish, deliver_get, ack).
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Messages enqueued.
    pub published: AtomicU64,
    /// Deliveries to consumers and gets.
    pub delivered: AtomicU64,
    /// Acknowledgements.
    pub acked: AtomicU64,
    last: parking_lot::Mutex<Option<StatsSample>>,
}

#[derive(Debug, Clone, Copy)]
struct StatsSample {
    at: std::time::Instant,
    counts: [u64; 3],
    rates: [f64; 3],
}

impl QueueStats {
    fn counts(&self) -> [u64; 3] {
        [
            self.published.load(Ordering::Relaxed),
            self.delivered.load(Ordering::Relaxed),
            self.acked.load(Ordering::Relaxed),
        ]
    }

    /// Takes a sample: rates become the change since the previous one per
    /// second. Called periodically (every 5 s) by the broker's monitor.
    pub fn sample(&self) {
        let now = std::time::Instant::now();
        let counts = self.counts();
        let mut last = self.last.lock();
        let rates = match *last {
            Some(prev) => {
                let secs = now.duration_since(prev.at).as_secs_f64().max(1e-3);
                [0, 1, 2].map(|i| {
                    counts[i].saturating_sub(prev.counts.get(i).copied().unwrap_or(0)) as f64 / secs
                })
            }
            None => [0.0; 3],
        };
        *last = Some(StatsSample {
            at: now,
            counts,
            rates,
        });
    }

    /// Counts (publish, deliver_get, ack) and their last sampled rates.
    pub fn snapshot(&self) -> ([u64; 3], [f64; 3]) {
        (
            self.counts(),
            self.last.lock().map_or([0.0; 3], |s| s.rates),
        )
    }
}

/// Estimated memory per queued message beyond its body: the queue entry and
/// bookkeeping. Used so that many tiny messages still count.
pub const ENTRY_OVERHEAD: u64 = 64;

/// Estimated memory per message whose queue entry is spilled to disk: the
/// store's word for its body and that map's slack.
pub const SPILLED_ENTRY_OVERHEAD: u64 = 24;

impl QueueState {
    /// Enqueues a published message and delivers what it can; returns the
    /// outcome and whether anything was written to the store (then a confirm
    /// must wait for the commit point). The writes are submitted before
    /// delivering, so that a body paged out on enqueue can already be loaded.
    pub fn publish(
        &mut self,
        handle: &QueueHandle,
        message: &Arc<Message>,
        store: &Store,
        fx: &mut Effects,
    ) -> (Enqueued, bool) {
        let outcome = self.queue.publish(message, now_ms(), fx);
        if outcome == Enqueued::Accepted {
            handle.stats.published.fetch_add(1, Ordering::Relaxed);
        }
        let wrote = !fx.writes.is_empty();
        if wrote {
            store.submit(fx.writes.drain(..));
        }
        self.dispatch(handle, store, fx);
        // A message with a TTL of 0 that no consumer took expires now.
        if self.queue.take_zero_ttl_published() {
            self.queue.expire_undelivered(now_ms(), fx);
        }
        (outcome, wrote)
    }

    /// Memory of the ready messages only: what publishers are paused for.
    /// (Unacknowledged ones wait for consumers; counting them could pause a
    /// connection whose own acks would relieve the queue.)
    pub fn ready_memory(&self) -> u64 {
        let spilled = self.queue.spilled_count();
        self.queue.loaded_bytes()
            + (self.queue.ready_count() - spilled) * ENTRY_OVERHEAD
            + spilled * SPILLED_ENTRY_OVERHEAD
    }

    /// Memory this queue accounts for: bodies it holds in memory (ready and
    /// delivered-but-unacknowledged) plus [`ENTRY_OVERHEAD`] per message in
    /// memory and [`SPILLED_ENTRY_OVERHEAD`] per spilled one.
    pub fn memory_in_use(&self) -> u64 {
        self.ready_memory()
            + self.queue.unacked_bytes()
            + self.queue.unacked_count() * ENTRY_OVERHEAD
    }

    /// Hands ready messages to consumers with credit (see
    /// [`QueueState::dispatch_ready`]), then lowers the queue's flow gate if
    /// that drained it enough.
    pub fn dispatch(&mut self, handle: &QueueHandle, store: &Store, fx: &mut Effects) {
        self.dispatch_ready(handle, store, fx);
        handle.relieve_flow(self);
    }

    /// Hands ready messages to consumers with credit, round-robin, until the
    /// queue is empty or no consumer can take more.
    fn dispatch_ready(&mut self, handle: &QueueHandle, store: &Store, fx: &mut Effects) {
        if self.consumers.is_empty() || self.deleted {
            return;
        }
        let now = now_ms();
        loop {
            if self.queue.ready_count() == 0 {
                return;
            }
            // The consumer to serve: with a single active consumer only the
            // first registered one; otherwise the highest priority among
            // those with credit, round-robin within that priority.
            let n = if self.queue.args().single_active_consumer {
                1
            } else {
                self.consumers.len()
            };
            let ready = |c: &Consumer| c.has_credit() && c.channel.can_deliver();
            let Some(best) = self
                .consumers
                .iter()
                .take(n)
                .filter(|c| ready(c))
                .map(|c| c.priority)
                .max()
            else {
                return;
            };
            let Some(idx) = (0..n).map(|i| (self.next_consumer + i) % n).find(|&i| {
                self.consumers
                    .get(i)
                    .is_some_and(|c| c.priority == best && ready(c))
            }) else {
                return;
            };
            self.next_consumer = (idx + 1) % n;
            let Some(consumer) = self.consumers.get(idx) else {
                return;
            };
            let ack = !consumer.no_ack;
            let Some(delivery) = self.queue.deliver(now, ack, fx) else {
                return;
            };
            handle.stats.delivered.fetch_add(1, Ordering::Relaxed);
            let consumer = &self.consumers[idx];
            deliver(handle, consumer, delivery, store, fx, &mut self.queue);
        }
    }
}

/// Loads a message that may be paged out.
pub fn load(message: &MessageRef, store: &Store) -> Option<Arc<Message>> {
    match message {
        MessageRef::Loaded(m) => Some(m.clone()),
        MessageRef::Paged(id) => match store.load(*id) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot load paged message");
                None
            }
        },
    }
}

/// Sends one delivery to a consumer: tag it on the channel, encode it into the
/// connection's outbox.
fn deliver(
    handle: &QueueHandle,
    consumer: &Consumer,
    delivery: Delivery,
    store: &Store,
    fx: &mut Effects,
    queue: &mut Queue,
) {
    let Some(message) = load(&delivery.message, store) else {
        // The body is gone (storage failure): settle it rather than loop.
        if !consumer.no_ack {
            queue.ack(delivery.seq, fx);
        }
        return;
    };
    let tag = consumer.channel.next_delivery(if consumer.no_ack {
        None
    } else {
        Some(Unacked {
            queue: handle.id,
            seq: delivery.seq,
            consumer_unacked: Some(consumer.unacked.clone()),
            consumer: Some(consumer.tag.clone()),
            delivered_at: now_ms(),
        })
    });
    if !consumer.no_ack {
        consumer.unacked.fetch_add(1, Ordering::Relaxed);
    }
    let method = Method::BasicDeliver(BasicDeliver {
        consumer_tag: consumer.tag.clone(),
        delivery_tag: tag,
        redelivered: delivery.redelivered,
        exchange: message.exchange.clone(),
        routing_key: message.routing_key.clone(),
    });
    let header = with_delivery_count(&message.header, delivery.delivery_count);
    consumer
        .channel
        .write_content(&method, &header, &message.body);
    if handle.tracer.is_on() {
        consumer
            .channel
            .trace_delivery(handle, &message, delivery.redelivered);
    }
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

/// Tells a consumer's client that the broker cancelled it (queue deleted), if
/// the client advertised `consumer_cancel_notify`.
pub fn notify_cancel(consumer: &Consumer) {
    if consumer.channel.connection.cancel_notify {
        // (Not on a channel that closed meanwhile: nothing after close-ok.)
        consumer
            .channel
            .write_methods_if_open(&[Method::BasicCancel(BasicCancel {
                consumer_tag: consumer.tag.clone(),
                nowait: true,
            })]);
    }
    consumer.channel.forget_consumer(&consumer.tag);
}
