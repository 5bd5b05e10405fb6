//! [`ChannelShared`]: the part of a channel that queues and other tasks
//! touch when they deliver or confirm — delivery tags, unacknowledged and
//! transaction-held deliveries, the channel-wide prefetch, and writing
//! frames (never after the channel's close-ok).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use amqp_codec::methods::{BasicCancel, BasicDeliver};
use amqp_codec::{ContentHeader, Method, ShortStr, encode_method};
use parking_lot::Mutex;
use queue_store::Message;

use super::ConnectionShared;
use crate::error::AmqpError;
use crate::metrics::DeliveryKind;
use crate::queue::{
    DeliverySink, Outgoing, QueueHandle, SinkInfo, Unacked, encode_content, now_ms,
    with_delivery_count,
};

#[derive(Debug, Default)]
struct Deliveries {
    next_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
    /// Deliveries acknowledged (or rejected) inside a transaction not yet
    /// committed: no longer outstanding for the channel (a second ack is
    /// 406, `basic.recover` leaves them), still unsettled at their queues.
    held: BTreeMap<u64, Unacked>,
    /// `basic.qos` with global=true: limit for the whole channel (0 = none).
    global_prefetch: u16,
    closed: bool,
    /// Consumer tag → queue id, for cancels.
    consumers: HashMap<ShortStr, u64>,
}

/// The part of a channel that queues and other tasks touch.
#[derive(Debug)]
pub struct ChannelShared {
    /// Channel number.
    pub id: u16,
    /// Its connection.
    pub connection: Arc<ConnectionShared>,
    deliveries: Mutex<Deliveries>,
    /// For the management API: 1 in confirm mode, 2 transactional.
    mode: std::sync::atomic::AtomicU8,
    /// For the management API: `basic.qos` per-consumer prefetch.
    prefetch: std::sync::atomic::AtomicU16,
    /// For metrics: publishes in confirm mode not yet confirmed or nacked.
    unconfirmed: std::sync::atomic::AtomicU64,
    /// The management API's `message_stats` of the channel
    /// ([`CHANNEL_STATS`]), with rates the monitor samples.
    pub stats: crate::rates::RatedCounters<11>,
    /// For the management API: publishes a transaction holds until its
    /// commit (set by the channel's task).
    pub uncommitted_publishes: std::sync::atomic::AtomicU64,
}

/// RabbitMQ's names for a channel's message counters, in the order
/// [`ChannelShared::stats`] keeps them (RabbitMQ's `deliver_get` is the sum
/// of the four from `deliver` on).
pub const CHANNEL_STATS: [&str; 11] = [
    "publish",
    "confirm",
    "return_unroutable",
    "drop_unroutable",
    "deliver",
    "deliver_no_ack",
    "get",
    "get_no_ack",
    "get_empty",
    "redeliver",
    "ack",
];

/// Where each of [`CHANNEL_STATS`] is.
pub(crate) mod stat {
    pub(crate) const PUBLISH: usize = 0;
    pub(crate) const CONFIRM: usize = 1;
    pub(crate) const RETURN_UNROUTABLE: usize = 2;
    pub(crate) const DROP_UNROUTABLE: usize = 3;
    pub(crate) const DELIVER: usize = 4;
    pub(crate) const GET_EMPTY: usize = 8;
    pub(crate) const REDELIVER: usize = 9;
    pub(crate) const ACK: usize = 10;
}

/// A channel's mode and per-consumer prefetch, as the management API
/// shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelModes {
    /// `basic.qos` prefetch for new consumers.
    pub prefetch: u16,
    /// `confirm.select` was sent.
    pub confirm: bool,
    /// `tx.select` was sent.
    pub transactional: bool,
}

impl ChannelShared {
    pub(crate) fn new(id: u16, connection: Arc<ConnectionShared>) -> Arc<ChannelShared> {
        Arc::new(ChannelShared {
            id,
            connection,
            deliveries: Mutex::new(Deliveries {
                next_tag: 1,
                ..Deliveries::default()
            }),
            mode: std::sync::atomic::AtomicU8::new(0),
            prefetch: std::sync::atomic::AtomicU16::new(0),
            unconfirmed: std::sync::atomic::AtomicU64::new(0),
            stats: crate::rates::RatedCounters::default(),
            uncommitted_publishes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Notes the channel's mode (`confirm`, else transactional) for the
    /// management API.
    pub(crate) fn note_mode(&self, confirm: bool) {
        self.mode
            .store(if confirm { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// Notes the per-consumer prefetch for the management API.
    pub(crate) fn note_prefetch(&self, prefetch: u16) {
        self.prefetch.store(prefetch, Ordering::Relaxed);
    }

    /// Notes a publish (awaiting its confirm if `confirm`), for metrics.
    pub(crate) fn note_published(&self, confirm: bool) {
        self.stats.add(stat::PUBLISH, 1);
        if confirm {
            self.unconfirmed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Notes `n` publishes confirmed or nacked, for metrics.
    pub(crate) fn note_confirmed(&self, n: u64) {
        self.unconfirmed.fetch_sub(n, Ordering::Relaxed);
    }

    /// Whether it has published (RabbitMQ then counts it a publisher), and
    /// its publishes awaiting confirms.
    pub fn publishing(&self) -> (bool, u64) {
        (
            self.stats.get(stat::PUBLISH) > 0,
            self.unconfirmed.load(Ordering::Relaxed),
        )
    }

    /// What its open transaction holds: publishes, and deliveries it
    /// acknowledged (RabbitMQ's `messages_uncommitted`, `acks_uncommitted`).
    pub fn uncommitted(&self) -> (u64, u64) {
        (
            self.uncommitted_publishes.load(Ordering::Relaxed),
            self.deliveries.lock().held.len() as u64,
        )
    }

    /// Its mode and per-consumer prefetch.
    pub fn modes(&self) -> ChannelModes {
        let mode = self.mode.load(Ordering::Relaxed);
        ChannelModes {
            prefetch: self.prefetch.load(Ordering::Relaxed),
            confirm: mode == 1,
            transactional: mode == 2,
        }
    }

    /// For listings: (unacknowledged deliveries, channel-wide prefetch, consumers).
    pub fn stats(&self) -> (usize, u16, usize) {
        let d = self.deliveries.lock();
        (
            d.unacked.len() + d.held.len(),
            d.global_prefetch,
            d.consumers.len(),
        )
    }

    /// Whether a queue may deliver to this channel now.
    pub fn can_deliver(&self) -> bool {
        let d = self.deliveries.lock();
        !d.closed
            && (d.global_prefetch == 0
                || d.unacked.len() + d.held.len() < usize::from(d.global_prefetch))
            && !self.connection.outbox.is_full()
    }

    /// Allocates a delivery tag, remembering the delivery if it needs an ack
    /// (and counting it as a delivery of `kind`, `redelivered` or not).
    pub fn next_delivery(
        &self,
        kind: DeliveryKind,
        redelivered: bool,
        unacked: Option<Unacked>,
    ) -> u64 {
        self.connection
            .metrics
            .delivered(kind, unacked.is_some(), redelivered);
        // deliver, deliver_no_ack, get, get_no_ack: in that order.
        let by_kind = stat::DELIVER
            + 2 * usize::from(kind == DeliveryKind::Get)
            + usize::from(unacked.is_none());
        self.stats.add(by_kind, 1);
        if redelivered {
            self.stats.add(stat::REDELIVER, 1);
        }
        let mut d = self.deliveries.lock();
        let tag = d.next_tag;
        d.next_tag += 1;
        if let Some(u) = unacked {
            d.unacked.insert(tag, u);
        }
        tag
    }

    /// Writes a method frame.
    pub fn write_method(&self, method: &Method) {
        self.connection.outbox.write(|buf| {
            if let Err(e) = encode_method(buf, self.id, method) {
                tracing::error!(error = %e, "cannot encode {}", method.name());
            }
        });
    }

    /// Writes method frames unless the channel was closed (released): no
    /// frame may follow the `channel.close-ok` (sent once the channel is
    /// released), so tasks other than the connection's write through here.
    /// Returns whether they were written.
    pub fn write_methods_if_open(&self, methods: &[Method]) -> bool {
        let d = self.deliveries.lock();
        if d.closed {
            return false;
        }
        for m in methods {
            self.write_method(m);
        }
        drop(d);
        true
    }

    /// Writes a content-carrying message unless the channel was closed (see
    /// [`ChannelShared::write_methods_if_open`]).
    pub fn write_content_if_open(
        &self,
        method: &Method,
        header: &ContentHeader,
        body: &[u8],
    ) -> bool {
        let d = self.deliveries.lock();
        if d.closed {
            return false;
        }
        self.write_content(method, header, body);
        drop(d);
        true
    }

    /// Records a `deliver.<queue>` firehose copy of a delivery on this channel.
    pub fn trace_delivery(&self, queue: &QueueHandle, message: &Message, redelivered: bool) {
        let conn = &self.connection;
        queue.tracer.delivered(
            &conn.vhost,
            &queue.name,
            message,
            redelivered,
            crate::trace::Party {
                connection: &conn.name,
                channel: self.id,
                user: &conn.user,
            },
        );
    }

    /// Writes a content-carrying method with header and body.
    pub fn write_content(&self, method: &Method, header: &ContentHeader, body: &[u8]) {
        let frame_max = self.connection.frame_max.load(Ordering::Relaxed);
        self.connection
            .outbox
            .write(|buf| encode_content(buf, self.id, method, header, body, frame_max));
    }

    /// Forgets a consumer the broker cancelled.
    pub fn forget_consumer(&self, tag: &ShortStr) {
        self.deliveries.lock().consumers.remove(tag);
    }

    /// Removes the deliveries an ack/nack/reject names. As RabbitMQ 3.10
    /// does: `tag` 0 with `multiple` means every outstanding delivery (none
    /// is fine); otherwise `tag` itself must be outstanding, with `multiple`
    /// too (a lower outstanding tag does not make an unknown one valid).
    pub(crate) fn take(&self, tag: u64, multiple: bool) -> Result<Vec<Unacked>, AmqpError> {
        Ok(self
            .take_tagged(tag, multiple)?
            .into_iter()
            .map(|(_, u)| u)
            .collect())
    }

    /// [`ChannelShared::take`], with the delivery tags.
    pub(crate) fn take_tagged(
        &self,
        tag: u64,
        multiple: bool,
    ) -> Result<Vec<(u64, Unacked)>, AmqpError> {
        take_tagged(&mut self.deliveries.lock(), tag, multiple)
    }

    /// Marks the channel closed: queues stop delivering to it and nothing
    /// more is written (its close-ok follows).
    pub(crate) fn mark_closed(&self) {
        self.deliveries.lock().closed = true;
    }

    /// The channel-wide prefetch (`basic.qos` global=true; 0 = none).
    pub(crate) fn global_prefetch(&self) -> u16 {
        self.deliveries.lock().global_prefetch
    }

    /// Sets the channel-wide prefetch.
    pub(crate) fn set_global_prefetch(&self, count: u16) {
        self.deliveries.lock().global_prefetch = count;
    }

    /// Remembers which queue a consumer of this channel consumes from.
    pub(crate) fn add_consumer(&self, tag: ShortStr, queue: u64) {
        self.deliveries.lock().consumers.insert(tag, queue);
    }

    /// The oldest outstanding delivery: (queue, delivered at, consumer tag).
    pub(crate) fn oldest_unacked(&self) -> Option<(u64, u64, Option<ShortStr>)> {
        self.deliveries
            .lock()
            .unacked
            .first_key_value()
            .map(|(_, u)| (u.queue, u.delivered_at, u.consumer.clone()))
    }

    /// Whether the channel was closed (released).
    pub fn is_closed(&self) -> bool {
        self.deliveries.lock().closed
    }

    /// Whether the broker still knows consumer `tag` on this channel (it
    /// forgets consumers it cancelled, e.g. when their queue was deleted).
    pub(crate) fn has_consumer(&self, tag: &ShortStr) -> bool {
        self.deliveries.lock().consumers.contains_key(tag)
    }

    /// Moves the deliveries an ack/nack/reject inside a transaction names
    /// (by [`ChannelShared::take`]'s rule) from outstanding to held until
    /// the commit; returns their tags.
    pub(crate) fn hold(&self, tag: u64, multiple: bool) -> Result<Vec<u64>, AmqpError> {
        // One lock section: the deliveries are never in neither map (a
        // channel-wide prefetch counts both).
        let mut d = self.deliveries.lock();
        let taken = take_tagged(&mut d, tag, multiple)?;
        let tags = taken.iter().map(|(t, _)| *t).collect();
        d.held.extend(taken);
        Ok(tags)
    }

    /// The held deliveries `tags` names, at commit.
    pub(crate) fn take_held(&self, tags: &[u64]) -> Vec<Unacked> {
        let mut d = self.deliveries.lock();
        tags.iter().filter_map(|t| d.held.remove(t)).collect()
    }

    /// Makes held deliveries outstanding again (`tx.rollback`, as RabbitMQ).
    pub(crate) fn restore_held(&self) {
        let mut d = self.deliveries.lock();
        let held = std::mem::take(&mut d.held);
        d.unacked.extend(held);
    }

    /// Removes every outstanding delivery of one consumer.
    pub(crate) fn take_consumer(&self, tag: &ShortStr) -> Vec<Unacked> {
        let mut d = self.deliveries.lock();
        let tags: Vec<u64> = d
            .unacked
            .iter()
            .filter(|(_, u)| u.consumer.as_ref() == Some(tag))
            .map(|(t, _)| *t)
            .collect();
        tags.iter().filter_map(|t| d.unacked.remove(t)).collect()
    }

    /// Every outstanding delivery (`basic.recover`); held ones stay held.
    pub(crate) fn take_outstanding(&self) -> Vec<Unacked> {
        std::mem::take(&mut self.deliveries.lock().unacked)
            .into_values()
            .collect()
    }

    /// Every unsettled delivery, outstanding or held (the channel closes).
    pub(crate) fn take_all(&self) -> Vec<Unacked> {
        let mut d = self.deliveries.lock();
        let held = std::mem::take(&mut d.held);
        let mut all: Vec<Unacked> = std::mem::take(&mut d.unacked).into_values().collect();
        all.extend(held.into_values());
        all
    }
}

/// The outstanding deliveries an ack/nack/reject names, removed, with their
/// tags (see [`ChannelShared::take`] for the rule).
fn take_tagged(
    d: &mut Deliveries,
    tag: u64,
    multiple: bool,
) -> Result<Vec<(u64, Unacked)>, AmqpError> {
    if multiple && tag == 0 {
        return Ok(std::mem::take(&mut d.unacked).into_iter().collect());
    }
    let Some(one) = d.unacked.remove(&tag) else {
        return Err(AmqpError::precondition_failed(format!(
            "unknown delivery tag {tag}"
        )));
    };
    let mut taken = Vec::new();
    if multiple {
        let rest = d.unacked.split_off(&tag);
        taken.extend(std::mem::replace(&mut d.unacked, rest));
    }
    taken.push((tag, one));
    Ok(taken)
}

/// The local delivery sink: a delivery is tagged on this channel (and kept
/// for its ack), encoded straight into the connection's outbox (the body's
/// `Bytes` are not copied before that), and traced if the firehose is on.
impl DeliverySink for ChannelShared {
    fn can_deliver(&self) -> bool {
        ChannelShared::can_deliver(self)
    }

    fn deliver(&self, out: Outgoing<'_>) {
        let unacked = out.consumer_unacked.map(|unacked| Unacked {
            queue: out.queue.id,
            seq: out.seq,
            consumer_unacked: Some(unacked.clone()),
            consumer: Some(out.consumer_tag.clone()),
            delivered_at: now_ms(),
        });
        let tag = self.next_delivery(DeliveryKind::Consume, out.redelivered, unacked);
        if let Some(unacked) = out.consumer_unacked {
            unacked.fetch_add(1, Ordering::Relaxed);
        }
        let message = out.message;
        let method = Method::BasicDeliver(BasicDeliver {
            consumer_tag: out.consumer_tag.clone(),
            delivery_tag: tag,
            redelivered: out.redelivered,
            exchange: message.exchange.clone(),
            routing_key: message.routing_key.clone(),
        });
        let header = with_delivery_count(&message.header, out.delivery_count);
        self.write_content(&method, &header, &message.body);
        if out.queue.tracer.is_on() {
            self.trace_delivery(out.queue, message, out.redelivered);
        }
    }

    fn cancelled_by_broker(&self, consumer_tag: &ShortStr) {
        if self.connection.cancel_notify {
            // (Not on a channel that closed meanwhile: nothing after close-ok.)
            self.write_methods_if_open(&[Method::BasicCancel(BasicCancel {
                consumer_tag: consumer_tag.clone(),
                nowait: true,
            })]);
        }
        self.forget_consumer(consumer_tag);
    }

    fn describe(&self) -> SinkInfo {
        SinkInfo {
            tag: None,
            connection_name: self.connection.name.clone(),
            channel: self.id,
            peer: self.connection.peer,
            user: self.connection.user.clone(),
        }
    }
}
