//! Channels: the per-channel state machine (`handle_<class>_<method>`), owned
//! by its connection's task, and [`ChannelShared`], the part queues touch when
//! they deliver (delivery tags, unacked messages, prefetch, flow).
//!
//! ```text
//!   channel.open ──▶ Open ──(client channel.close)──▶ closed (close-ok sent)
//!                     │
//!                     └──(soft error: server channel.close)──▶ Closing
//!                            └── only channel.close / close-ok accepted ──▶ closed
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use amqp_codec::methods::*;
use amqp_codec::{
    Command, CommandAssembler, ContentHeader, FieldTable, Method, ShortStr, encode_method,
    reply_code,
};
use bytes::Bytes;
use exchange::{BindingDef, Destination, ExchangeDeclare as RouterDeclare, Routed};
use parking_lot::Mutex;
use queue_store::{Effects, Message, QueueArgs, args::first_difference, parse_expiration};

use crate::auth::{Access, Resource};
use crate::broker::Broker;
use crate::connection::ConnectionShared;
use crate::error::AmqpError;
use crate::queue::{Consumer, QueueHandle, encode_content, now_ms};
use crate::reply_to;
use crate::vhost::{Enqueue, Publish, Vhost};

/// One unacknowledged delivery on a channel.
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
}

impl ChannelShared {
    fn new(id: u16, connection: Arc<ConnectionShared>) -> Arc<ChannelShared> {
        Arc::new(ChannelShared {
            id,
            connection,
            deliveries: Mutex::new(Deliveries {
                next_tag: 1,
                ..Deliveries::default()
            }),
        })
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

    /// Allocates a delivery tag, remembering the delivery if it needs an ack.
    pub fn next_delivery(&self, unacked: Option<Unacked>) -> u64 {
        self.connection.metrics.delivered.inc();
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
    fn take(&self, tag: u64, multiple: bool) -> Result<Vec<Unacked>, AmqpError> {
        Ok(self
            .take_tagged(tag, multiple)?
            .into_iter()
            .map(|(_, u)| u)
            .collect())
    }

    /// [`ChannelShared::take`], with the delivery tags.
    fn take_tagged(&self, tag: u64, multiple: bool) -> Result<Vec<(u64, Unacked)>, AmqpError> {
        take_tagged(&mut self.deliveries.lock(), tag, multiple)
    }

    /// Whether the channel was closed (released).
    pub fn is_closed(&self) -> bool {
        self.deliveries.lock().closed
    }

    /// Whether the broker still knows consumer `tag` on this channel (it
    /// forgets consumers it cancelled, e.g. when their queue was deleted).
    fn has_consumer(&self, tag: &ShortStr) -> bool {
        self.deliveries.lock().consumers.contains_key(tag)
    }

    /// Moves the deliveries an ack/nack/reject inside a transaction names
    /// (by [`ChannelShared::take`]'s rule) from outstanding to held until
    /// the commit; returns their tags.
    fn hold(&self, tag: u64, multiple: bool) -> Result<Vec<u64>, AmqpError> {
        // One lock section: the deliveries are never in neither map (a
        // channel-wide prefetch counts both).
        let mut d = self.deliveries.lock();
        let taken = take_tagged(&mut d, tag, multiple)?;
        let tags = taken.iter().map(|(t, _)| *t).collect();
        d.held.extend(taken);
        Ok(tags)
    }

    /// The held deliveries `tags` names, at commit.
    fn take_held(&self, tags: &[u64]) -> Vec<Unacked> {
        let mut d = self.deliveries.lock();
        tags.iter().filter_map(|t| d.held.remove(t)).collect()
    }

    /// Makes held deliveries outstanding again (`tx.rollback`, as RabbitMQ).
    fn restore_held(&self) {
        let mut d = self.deliveries.lock();
        let held = std::mem::take(&mut d.held);
        d.unacked.extend(held);
    }

    /// Removes every outstanding delivery of one consumer.
    fn take_consumer(&self, tag: &ShortStr) -> Vec<Unacked> {
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
    fn take_outstanding(&self) -> Vec<Unacked> {
        std::mem::take(&mut self.deliveries.lock().unacked)
            .into_values()
            .collect()
    }

    /// Every unsettled delivery, outstanding or held (the channel closes).
    fn take_all(&self) -> Vec<Unacked> {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// The broker sent `channel.close`; waiting for `close-ok`.
    Closing,
}

/// Publisher-confirm bookkeeping.
#[derive(Debug, Default)]
struct Confirms {
    /// Sequence number of the last publish.
    published: u64,
    /// Highest sequence number already acked or nacked.
    confirmed: u64,
    /// Publishes of the current batch that were refused (nack).
    nacked: Vec<u64>,
    /// Whether the current batch wrote to the store (ack after fsync).
    needs_sync: bool,
    /// Commits in flight for earlier batches (later acks must wait for them).
    in_flight: Arc<AtomicUsize>,
    /// Resolves when the previous batch's confirms were written: each batch
    /// waits for it, so confirms leave in order even though each batch's
    /// task wakes independently.
    previous: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// A publish or a settlement held back by a transaction.
#[derive(Debug)]
enum TxAction {
    Publish(BasicPublish, ContentHeader, Bytes),
    /// An ack, nack or reject: the deliveries (held on the channel) it settles.
    Settle(Vec<u64>, Settle),
}

/// A channel's state machine.
#[derive(Debug)]
pub struct Channel {
    /// Shared part.
    pub shared: Arc<ChannelShared>,
    /// Frame → command.
    pub assembler: CommandAssembler,
    state: State,
    confirms: Option<Confirms>,
    tx: Option<Vec<TxAction>>,
    /// Prefetch for consumers started from now on (`basic.qos` global=false).
    prefetch: u16,
    /// This channel's consumers: tag → queue.
    consumers: Vec<(ShortStr, Arc<QueueHandle>)>,
    routed: Routed,
    fx: Effects,
    /// This channel's direct reply-to consumer: (token, consumer tag).
    reply_consumer: Option<(String, ShortStr)>,
    /// Which consumer's queue dispatches first next time the channel's
    /// credit comes back (see [`Vhost::dispatch_channel`]).
    dispatch_turn: AtomicUsize,
    /// The queue this channel declared last (empty: none yet), which an
    /// empty queue name stands for.
    last_queue: ShortStr,
}

fn server_name(prefix: &str) -> ShortStr {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    let suffix: String = (0..22)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    ShortStr::try_from(format!("{prefix}{suffix}")).unwrap_or_default()
}

impl Channel {
    /// A newly opened channel.
    pub fn new(id: u16, connection: Arc<ConnectionShared>, max_body: u64) -> Channel {
        Channel {
            shared: ChannelShared::new(id, connection),
            assembler: CommandAssembler::new(max_body),
            state: State::Open,
            confirms: None,
            tx: None,
            prefetch: 0,
            consumers: Vec::new(),
            routed: Routed::default(),
            fx: Effects::default(),
            reply_consumer: None,
            dispatch_turn: AtomicUsize::new(0),
            last_queue: ShortStr::default(),
        }
    }

    /// The queue an empty name stands for: the channel's last declared one
    /// (the spec's rule, which RabbitMQ implements), 404 if there is none.
    fn queue_name(&self, name: ShortStr) -> Result<ShortStr, AmqpError> {
        if !name.is_empty() {
            return Ok(name);
        }
        if self.last_queue.is_empty() {
            return Err(AmqpError::not_found("no previously declared queue"));
        }
        Ok(self.last_queue.clone())
    }

    /// Resolves the names a method carries as RabbitMQ does before acting on
    /// them: `\r` and `\n` are stripped from the queue and exchange names of
    /// declares, binds, unbinds and deletes (not of publishes, gets,
    /// consumes or purges); an empty queue name is the last declared queue,
    /// and `queue.bind` / `queue.unbind` with an empty queue and routing key
    /// use that queue's name as the key.
    fn resolve_names(&self, method: Method) -> Result<Method, AmqpError> {
        Ok(match method {
            Method::QueueDeclare(mut m) => {
                m.queue = strip_cr_lf(m.queue);
                Method::QueueDeclare(m)
            }
            Method::ExchangeDeclare(mut m) => {
                m.exchange = strip_cr_lf(m.exchange);
                Method::ExchangeDeclare(m)
            }
            Method::ExchangeDelete(mut m) => {
                m.exchange = strip_cr_lf(m.exchange);
                Method::ExchangeDelete(m)
            }
            Method::ExchangeBind(mut m) => {
                m.source = strip_cr_lf(m.source);
                m.destination = strip_cr_lf(m.destination);
                Method::ExchangeBind(m)
            }
            Method::ExchangeUnbind(mut m) => {
                m.source = strip_cr_lf(m.source);
                m.destination = strip_cr_lf(m.destination);
                Method::ExchangeUnbind(m)
            }
            Method::QueueBind(mut m) => {
                let shortcut = m.queue.is_empty();
                m.queue = self.queue_name(strip_cr_lf(m.queue))?;
                m.exchange = strip_cr_lf(m.exchange);
                if shortcut && m.routing_key.is_empty() {
                    m.routing_key = m.queue.clone();
                }
                Method::QueueBind(m)
            }
            Method::QueueUnbind(mut m) => {
                let shortcut = m.queue.is_empty();
                m.queue = self.queue_name(strip_cr_lf(m.queue))?;
                m.exchange = strip_cr_lf(m.exchange);
                if shortcut && m.routing_key.is_empty() {
                    m.routing_key = m.queue.clone();
                }
                Method::QueueUnbind(m)
            }
            Method::QueueDelete(mut m) => {
                m.queue = self.queue_name(strip_cr_lf(m.queue))?;
                Method::QueueDelete(m)
            }
            Method::QueuePurge(mut m) => {
                m.queue = self.queue_name(m.queue)?;
                Method::QueuePurge(m)
            }
            Method::BasicConsume(mut m) => {
                m.queue = self.queue_name(m.queue)?;
                Method::BasicConsume(m)
            }
            Method::BasicGet(mut m) => {
                m.queue = self.queue_name(m.queue)?;
                Method::BasicGet(m)
            }
            other => other,
        })
    }

    /// Settles deliveries now, or, in a transaction, holds them (no longer
    /// outstanding for the channel, as in RabbitMQ) until commit.
    fn settle_or_hold(
        &mut self,
        broker: &Arc<Broker>,
        vhost: &Vhost,
        tag: u64,
        multiple: bool,
        how: Settle,
    ) -> Result<(), AmqpError> {
        if let Some(actions) = &mut self.tx {
            let tags = self.shared.hold(tag, multiple)?;
            actions.push(TxAction::Settle(tags, how));
            return Ok(());
        }
        let taken = self.shared.take(tag, multiple)?;
        self.settle(broker, vhost, taken, how);
        Ok(())
    }

    /// Settles deliveries of this channel and lets queues deliver again.
    /// With a channel-wide prefetch, the credit that came back is offered to
    /// the channel's queues in turn, not first to the queues just settled
    /// (which would starve the others); those are dispatched after, for
    /// their consumers on other channels.
    fn settle(&self, broker: &Arc<Broker>, vhost: &Vhost, taken: Vec<Unacked>, how: Settle) {
        if self.shared.deliveries.lock().global_prefetch == 0 {
            vhost.settle(broker, taken, how);
            return;
        }
        let mut settled: Vec<u64> = taken.iter().map(|u| u.queue).collect();
        settled.sort_unstable();
        settled.dedup();
        vhost.settle_then(broker, taken, how, false);
        self.dispatch_all(broker, vhost);
        for id in settled {
            if let Some(q) = vhost.queue_by_id(id) {
                vhost.dispatch(broker, &q);
            }
        }
    }

    /// Lets every queue this channel consumes from deliver, starting with
    /// the next in turn.
    fn dispatch_all(&self, broker: &Arc<Broker>, vhost: &Vhost) {
        let start = self.dispatch_turn.fetch_add(1, Ordering::Relaxed);
        vhost.dispatch_channel(broker, &self.consumers, start);
    }

    /// Enforces the consumer (delivery acknowledgement) timeout: a delivery
    /// unacknowledged for longer than its queue's `x-consumer-timeout` (or
    /// the broker's default) closes the channel with RabbitMQ's 406, or, with
    /// `consumer_timeout_cancels_consumer`, cancels only that consumer and
    /// requeues its messages.
    ///
    /// As RabbitMQ does, only the oldest outstanding delivery is looked at
    /// (delivery tags follow delivery time), so a tick costs the same with a
    /// million unacknowledged messages as with one, and the delivery path is
    /// not held up behind a scan. A younger delivery from a queue with a
    /// shorter timeout is caught once the older ones are settled.
    pub fn check_consumer_timeout(
        &mut self,
        broker: &Arc<Broker>,
        vhost: &Vhost,
        now: u64,
    ) -> Result<(), AmqpError> {
        let default = broker.config.consumer_timeout.as_millis() as u64;
        let oldest = {
            let d = self.shared.deliveries.lock();
            d.unacked
                .first_key_value()
                .map(|(_, u)| (u.queue, u.delivered_at, u.consumer.clone()))
        };
        let expired = oldest.and_then(|(queue, delivered_at, consumer)| {
            let timeout = vhost
                .queue_by_id(queue)
                .and_then(|q| q.consumer_timeout())
                .unwrap_or(default);
            (now.saturating_sub(delivered_at) > timeout).then_some((timeout, consumer))
        });
        let Some((timeout, consumer)) = expired else {
            return Ok(());
        };
        match consumer {
            Some(tag) if broker.config.consumer_timeout_cancels_consumer => {
                tracing::warn!(channel = self.shared.id, consumer = %tag, timeout, "consumer timed out: cancelling it");
                if let Some(pos) = self.consumers.iter().position(|(t, _)| *t == tag) {
                    let (tag, queue) = self.consumers.remove(pos);
                    vhost.cancel_consumer(broker, &queue, &tag);
                }
                self.shared.forget_consumer(&tag);
                if self.shared.connection.cancel_notify {
                    self.shared.write_method(&Method::BasicCancel(BasicCancel {
                        consumer_tag: tag.clone(),
                        nowait: true,
                    }));
                }
                let theirs = self.shared.take_consumer(&tag);
                vhost.settle(broker, theirs, Settle::Requeue);
                Ok(())
            }
            _ => Err(AmqpError::precondition_failed(format!(
                "delivery acknowledgement on channel {} timed out. Timeout value used: {timeout} ms. This timeout value can be configured, see consumers doc guide to learn more",
                self.shared.id
            ))),
        }
    }

    /// Checks the connection's user may do `access` on a resource (403 if not).
    /// The binding an `exchange.bind` or `exchange.unbind` names, once the
    /// user may write the destination and read the source (RabbitMQ's rule).
    fn exchange_binding(
        &self,
        broker: &Broker,
        vhost: &Vhost,
        source: ShortStr,
        destination: ShortStr,
        routing_key: ShortStr,
        arguments: FieldTable,
    ) -> Result<BindingDef, AmqpError> {
        self.allow(
            broker,
            vhost,
            Resource::Exchange,
            &destination,
            Access::Write,
        )?;
        self.allow(broker, vhost, Resource::Exchange, &source, Access::Read)?;
        Ok(BindingDef {
            source,
            destination: Destination::Exchange(destination),
            routing_key,
            arguments,
        })
    }

    fn allow(
        &self,
        broker: &Broker,
        vhost: &Vhost,
        resource: Resource,
        name: &str,
        access: Access,
    ) -> Result<(), AmqpError> {
        // The default exchange is "amq.default" to permissions, as in RabbitMQ.
        let name = if resource == Resource::Exchange && name.is_empty() {
            "amq.default"
        } else {
            name
        };
        broker.auth.check(
            &self.shared.connection.user,
            vhost.name(),
            resource,
            name,
            access,
        )
    }

    /// Lets the queues this channel consumes from deliver again.
    pub fn redispatch(&mut self, broker: &Arc<Broker>, vhost: &Vhost) {
        let shared = self.shared.clone();
        self.consumers.retain(|(t, _)| shared.has_consumer(t));
        self.dispatch_all(broker, vhost);
    }

    /// What a publish inside a transaction must pass at once (RabbitMQ refuses
    /// it then, not at commit): permission, an existing, non-internal exchange.
    fn check_publish(
        &self,
        broker: &Broker,
        vhost: &Vhost,
        m: &BasicPublish,
    ) -> Result<(), AmqpError> {
        self.allow(
            broker,
            vhost,
            Resource::Exchange,
            &m.exchange,
            Access::Write,
        )?;
        if m.exchange.is_empty() {
            return Ok(());
        }
        match vhost.router.read().exchange(&m.exchange) {
            None => Err(AmqpError::not_found(format!(
                "no exchange '{}' in vhost '{}'",
                m.exchange,
                vhost.name()
            ))),
            Some(x) if x.internal => Err(AmqpError::access_refused(format!(
                "cannot publish to internal exchange '{}' in vhost '{}'",
                m.exchange,
                vhost.name()
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Whether the broker closed this channel and awaits `close-ok`.
    pub fn is_closing(&self) -> bool {
        self.state == State::Closing
    }

    /// Sends `channel.close` for a soft error and stops processing until `close-ok`.
    pub fn fail(&mut self, broker: &Arc<Broker>, vhost: &Vhost, e: &AmqpError) {
        tracing::info!(channel = self.shared.id, error = %e, "closing channel");
        self.release(broker, vhost);
        // Nothing follows channel.close: unconfirmed publishes stay unconfirmed.
        self.confirms = None;
        self.state = State::Closing;
        self.assembler.reset();
        self.shared
            .write_method(&Method::ChannelClose(ChannelClose {
                reply_code: e.code,
                reply_text: ShortStr::try_from(e.reply_text()).unwrap_or_default(),
                class_id: e.class_id,
                method_id: e.method_id,
            }));
    }

    /// Cancels consumers and requeues unacknowledged messages (channel or
    /// connection closing).
    pub fn release(&mut self, broker: &Arc<Broker>, vhost: &Vhost) {
        self.shared.deliveries.lock().closed = true;
        if let Some((token, _)) = self.reply_consumer.take() {
            broker.reply_consumers.unregister(&token);
        }
        for (tag, queue) in std::mem::take(&mut self.consumers) {
            vhost.cancel_consumer(broker, &queue, &tag);
        }
        let unacked = self.shared.take_all();
        vhost.settle(broker, unacked, Settle::Requeue);
    }

    /// Handles one complete command.
    pub async fn handle(
        &mut self,
        broker: &Arc<Broker>,
        vhost: &Arc<Vhost>,
        cmd: Command,
    ) -> Result<ChannelOutcome, AmqpError> {
        let (class_id, method_id) = (cmd.method.class_id(), cmd.method.method_id());
        if self.state == State::Closing {
            // The broker sent channel.close. A client channel.close that
            // crossed it is answered, and the channel stays known until the
            // client's close-ok for ours arrives (as RabbitMQ's reader does),
            // so that close-ok is not mistaken for a stray one (504).
            // Everything else is dropped.
            return Ok(match cmd.method {
                Method::ChannelCloseOk(_) => ChannelOutcome::Closed,
                Method::ChannelClose(_) => {
                    self.shared
                        .write_method(&Method::ChannelCloseOk(ChannelCloseOk {}));
                    ChannelOutcome::Open
                }
                // Reopening before the close-ok: the channel is still open
                // as far as the broker knows (RabbitMQ's 504).
                Method::ChannelOpen(_) => {
                    return Err(AmqpError::channel_error("second 'channel.open' seen").on(20, 10));
                }
                _ => ChannelOutcome::Open,
            });
        }
        self.dispatch(broker, vhost, cmd).await.map_err(|e| {
            if e.class_id == 0 {
                e.on(class_id, method_id)
            } else {
                e
            }
        })
    }

    async fn dispatch(
        &mut self,
        broker: &Arc<Broker>,
        vhost: &Arc<Vhost>,
        cmd: Command,
    ) -> Result<ChannelOutcome, AmqpError> {
        let Command { method, content } = cmd;
        let method = self.resolve_names(method)?;
        match method {
            Method::ChannelClose(_) => {
                // Confirms already due go out before the close-ok; none after.
                self.flush_confirms(broker);
                self.release(broker, vhost);
                self.shared
                    .write_method(&Method::ChannelCloseOk(ChannelCloseOk {}));
                return Ok(ChannelOutcome::Closed);
            }
            Method::ChannelCloseOk(_) => {
                return Err(AmqpError::command_invalid("unexpected channel.close-ok"));
            }
            Method::ChannelOpen(_) => {
                return Err(AmqpError::channel_error("second 'channel.open' seen"));
            }
            Method::ChannelFlow(m) => self.handle_channel_flow(m)?,
            Method::ChannelFlowOk(_) => {}
            Method::AccessRequest(_) => self
                .shared
                .write_method(&Method::AccessRequestOk(AccessRequestOk { ticket: 1 })),
            Method::ExchangeDeclare(m) => self.handle_exchange_declare(broker, vhost, m).await?,
            Method::ExchangeDelete(m) => self.handle_exchange_delete(broker, vhost, m).await?,
            Method::ExchangeBind(m) => {
                let def = self.exchange_binding(
                    broker,
                    vhost,
                    m.source,
                    m.destination,
                    m.routing_key,
                    m.arguments,
                )?;
                vhost.bind(broker, &def).await?;
                if !m.nowait {
                    self.shared
                        .write_method(&Method::ExchangeBindOk(ExchangeBindOk {}));
                }
            }
            Method::ExchangeUnbind(m) => {
                let def = self.exchange_binding(
                    broker,
                    vhost,
                    m.source,
                    m.destination,
                    m.routing_key,
                    m.arguments,
                )?;
                vhost.unbind(broker, &def).await?;
                if !m.nowait {
                    self.shared
                        .write_method(&Method::ExchangeUnbindOk(ExchangeUnbindOk {}));
                }
            }
            Method::QueueDeclare(m) => self.handle_queue_declare(broker, vhost, m).await?,
            Method::QueueBind(m) => {
                self.allow(broker, vhost, Resource::Queue, &m.queue, Access::Write)?;
                self.allow(broker, vhost, Resource::Exchange, &m.exchange, Access::Read)?;
                vhost.check_topic(
                    &broker.auth,
                    &self.shared.connection.user,
                    &m.exchange,
                    &m.routing_key,
                    Access::Read,
                )?;
                let queue = vhost
                    .queue_for(&m.queue, self.shared.connection.id)?
                    .name
                    .clone();
                let def = BindingDef {
                    source: m.exchange,
                    destination: Destination::Queue(queue),
                    routing_key: m.routing_key,
                    arguments: m.arguments,
                };
                vhost.bind(broker, &def).await?;
                if !m.nowait {
                    self.shared
                        .write_method(&Method::QueueBindOk(QueueBindOk {}));
                }
            }
            Method::QueueUnbind(m) => {
                self.allow(broker, vhost, Resource::Queue, &m.queue, Access::Write)?;
                self.allow(broker, vhost, Resource::Exchange, &m.exchange, Access::Read)?;
                // Unbinding is idempotent (a missing queue or binding is fine), but
                // another connection's exclusive queue is off limits (405).
                if let Some(q) = vhost.find_queue(&m.queue) {
                    vhost.check_exclusive(&q, self.shared.connection.id)?;
                }
                let queue = m.queue;
                let def = BindingDef {
                    source: m.exchange,
                    destination: Destination::Queue(queue),
                    routing_key: m.routing_key,
                    arguments: m.arguments,
                };
                vhost.unbind(broker, &def).await?;
                self.shared
                    .write_method(&Method::QueueUnbindOk(QueueUnbindOk {}));
            }
            Method::QueuePurge(m) => {
                self.allow(broker, vhost, Resource::Queue, &m.queue, Access::Read)?;
                let queue = vhost.queue_for(&m.queue, self.shared.connection.id)?;
                let count = vhost.purge(broker, &queue);
                if !m.nowait {
                    self.shared
                        .write_method(&Method::QueuePurgeOk(QueuePurgeOk {
                            message_count: count as u32,
                        }));
                }
            }
            Method::QueueDelete(m) => self.handle_queue_delete(broker, vhost, m).await?,
            Method::BasicQos(m) => {
                if m.prefetch_size != 0 {
                    return Err(AmqpError::not_implemented(format!(
                        "prefetch_size!=0 ({})",
                        m.prefetch_size
                    )));
                }
                if m.global {
                    self.shared.deliveries.lock().global_prefetch = m.prefetch_count;
                } else {
                    self.prefetch = m.prefetch_count;
                }
                self.shared.write_method(&Method::BasicQosOk(BasicQosOk {}));
                self.dispatch_all(broker, vhost);
            }
            Method::BasicConsume(m) => self.handle_basic_consume(broker, vhost, m)?,
            Method::BasicCancel(m) => {
                if self
                    .reply_consumer
                    .as_ref()
                    .is_some_and(|(_, t)| *t == m.consumer_tag)
                {
                    if let Some((token, _)) = self.reply_consumer.take() {
                        broker.reply_consumers.unregister(&token);
                    }
                }
                if let Some(pos) = self
                    .consumers
                    .iter()
                    .position(|(t, _)| *t == m.consumer_tag)
                {
                    let (tag, queue) = self.consumers.remove(pos);
                    self.shared.forget_consumer(&tag);
                    vhost.cancel_consumer(broker, &queue, &tag);
                }
                if !m.nowait {
                    self.shared
                        .write_method(&Method::BasicCancelOk(BasicCancelOk {
                            consumer_tag: m.consumer_tag,
                        }));
                }
            }
            Method::BasicPublish(m) => {
                let Some(content) = content else {
                    return Err(AmqpError::unexpected_frame("basic.publish without content"));
                };
                if m.immediate {
                    return Err(AmqpError::not_implemented("immediate=true"));
                }
                self.shared
                    .connection
                    .has_published
                    .store(true, Ordering::Relaxed);
                if self.tx.is_some() {
                    self.check_publish(broker, vhost, &m)?;
                }
                match &mut self.tx {
                    Some(actions) => {
                        actions.push(TxAction::Publish(m, content.header, content.body))
                    }
                    None => self.publish(broker, vhost, m, content.header, content.body)?,
                }
            }
            Method::BasicGet(m) => self.handle_basic_get(broker, vhost, m)?,
            Method::BasicAck(m) => {
                self.settle_or_hold(broker, vhost, m.delivery_tag, m.multiple, Settle::Ack)?;
            }
            Method::BasicNack(m) => {
                let how = Settle::requeue_or_reject(m.requeue);
                self.settle_or_hold(broker, vhost, m.delivery_tag, m.multiple, how)?;
            }
            Method::BasicReject(m) => {
                let how = Settle::requeue_or_reject(m.requeue);
                self.settle_or_hold(broker, vhost, m.delivery_tag, false, how)?;
            }
            Method::BasicRecover(m) => {
                if !m.requeue {
                    return Err(AmqpError::not_implemented("requeue=false"));
                }
                let unacked = self.shared.take_outstanding();
                vhost.settle(broker, unacked, Settle::Requeue);
                self.shared
                    .write_method(&Method::BasicRecoverOk(BasicRecoverOk {}));
            }
            Method::BasicRecoverAsync(m) => {
                // As RabbitMQ: redelivering to the same consumer is not offered.
                if !m.requeue {
                    return Err(AmqpError::not_implemented("requeue=false"));
                }
                let unacked = self.shared.take_outstanding();
                vhost.settle(broker, unacked, Settle::Requeue);
            }
            Method::ConfirmSelect(m) => {
                if self.tx.is_some() {
                    return Err(AmqpError::precondition_failed(
                        "cannot switch from tx to confirm mode",
                    ));
                }
                self.confirms.get_or_insert_with(Confirms::default);
                if !m.nowait {
                    self.shared
                        .write_method(&Method::ConfirmSelectOk(ConfirmSelectOk {}));
                }
            }
            Method::TxSelect(_) => {
                if self.confirms.is_some() {
                    return Err(AmqpError::precondition_failed(
                        "cannot switch from confirm to tx mode",
                    ));
                }
                self.tx.get_or_insert_with(Vec::new);
                self.shared.write_method(&Method::TxSelectOk(TxSelectOk {}));
            }
            Method::TxCommit(_) => {
                let Some(actions) = self.tx.replace(Vec::new()) else {
                    return Err(AmqpError::precondition_failed(
                        "channel is not transactional",
                    ));
                };
                self.commit(broker, vhost, actions)?;
                broker.store.commit().await?;
                self.shared.write_method(&Method::TxCommitOk(TxCommitOk {}));
            }
            Method::TxRollback(_) => {
                // Publishes of the transaction are dropped; deliveries it
                // acknowledged are outstanding again (RabbitMQ).
                if self.tx.replace(Vec::new()).is_none() {
                    return Err(AmqpError::precondition_failed(
                        "channel is not transactional",
                    ));
                }
                self.shared.restore_held();
                self.shared
                    .write_method(&Method::TxRollbackOk(TxRollbackOk {}));
            }
            other => {
                return Err(AmqpError::command_invalid(format!(
                    "unexpected method {} on a channel",
                    other.name()
                )));
            }
        }
        Ok(ChannelOutcome::Open)
    }

    /// `channel.flow` from the client. RabbitMQ 3.x refuses `active=false`
    /// with 540 (a connection error) rather than pausing deliveries as the
    /// spec describes; clients rely on RabbitMQ, so Warren does the same
    /// (consumers pause with `basic.qos` or `basic.cancel` instead).
    fn handle_channel_flow(&mut self, m: ChannelFlow) -> Result<(), AmqpError> {
        if !m.active {
            return Err(AmqpError::not_implemented("active=false"));
        }
        self.shared
            .write_method(&Method::ChannelFlowOk(ChannelFlowOk { active: true }));
        Ok(())
    }

    async fn handle_exchange_declare(
        &mut self,
        broker: &Arc<Broker>,
        vhost: &Vhost,
        m: ExchangeDeclare,
    ) -> Result<(), AmqpError> {
        if !m.passive && !m.exchange.is_empty() {
            self.allow(
                broker,
                vhost,
                Resource::Exchange,
                &m.exchange,
                Access::Configure,
            )?;
            // As RabbitMQ: naming an alternate exchange needs read access to
            // this exchange and write access to the alternate.
            if let Some(ae) = m
                .arguments
                .get("alternate-exchange")
                .and_then(amqp_codec::FieldValue::as_str)
            {
                self.allow(broker, vhost, Resource::Exchange, &m.exchange, Access::Read)?;
                self.allow(broker, vhost, Resource::Exchange, ae, Access::Write)?;
            }
        }
        let decl = RouterDeclare {
            name: &m.exchange,
            kind: &m.kind,
            durable: m.durable,
            auto_delete: m.auto_delete,
            internal: m.internal,
            arguments: &m.arguments,
        };
        vhost.declare_exchange(broker, decl, m.passive).await?;
        if !m.nowait {
            self.shared
                .write_method(&Method::ExchangeDeclareOk(ExchangeDeclareOk {}));
        }
        Ok(())
    }

    async fn handle_exchange_delete(
        &mut self,
        broker: &Arc<Broker>,
        vhost: &Vhost,
        m: amqp_codec::methods::ExchangeDelete,
    ) -> Result<(), AmqpError> {
        if !m.exchange.is_empty() {
            self.allow(
                broker,
                vhost,
                Resource::Exchange,
                &m.exchange,
                Access::Configure,
            )?;
        }
        vhost
            .delete_exchange(broker, &m.exchange, m.if_unused)
            .await?;
        if !m.nowait {
            self.shared
                .write_method(&Method::ExchangeDeleteOk(ExchangeDeleteOk {}));
        }
        Ok(())
    }

    async fn handle_queue_declare(
        &mut self,
        broker: &Arc<Broker>,
        vhost: &Arc<Vhost>,
        m: QueueDeclare,
    ) -> Result<(), AmqpError> {
        let conn = self.shared.connection.id;
        let name = if m.queue.is_empty() && !m.passive {
            server_name("amq.gen-")
        } else {
            m.queue.clone()
        };
        let (queue, messages, consumers) = if m.queue.as_str() == reply_to::PSEUDO_QUEUE
            || broker.reply_consumers.is_live_address(&m.queue)
        {
            // Direct reply-to, as RabbitMQ: the pseudo-queue, or a reply
            // address whose consumer is alive, has one consumer.
            (m.queue.clone(), 0, 1)
        } else if m.passive {
            let q = vhost.queue_for(&name, conn)?;
            let mut st = q.state.lock();
            // Any use renews an x-expires lease; a passive declare too.
            st.queue.touch(now_ms());
            (q.name.clone(), st.queue.ready_count(), st.consumers.len())
        } else {
            if name.starts_with("amq.") && !m.queue.is_empty() {
                return Err(AmqpError::access_refused(format!(
                    "queue name '{name}' contains reserved prefix 'amq.*'"
                )));
            }
            self.allow(broker, vhost, Resource::Queue, &name, Access::Configure)?;
            let args = QueueArgs::parse(&m.arguments, &name, vhost.name())?;
            // As RabbitMQ: naming a dead-letter exchange needs read access
            // to the queue and write access to the exchange.
            if let Some(dlx) = &args.dead_letter_exchange {
                self.allow(broker, vhost, Resource::Queue, &name, Access::Read)?;
                self.allow(broker, vhost, Resource::Exchange, dlx, Access::Write)?;
            }
            args.check_properties(m.durable, m.exclusive, m.auto_delete, &name, vhost.name())?;
            // As RabbitMQ: an exclusive queue is never durable, whatever the
            // declare says (so redeclaring it either way is equivalent).
            let m = QueueDeclare {
                durable: m.durable && !m.exclusive,
                ..m
            };
            let q = match vhost.find_queue(&name) {
                Some(existing) => {
                    vhost.check_same_owner(&existing, m.exclusive.then_some(conn))?;
                    check_equivalent(&existing, &m, vhost.name())?;
                    existing
                }
                None => {
                    vhost
                        .declare_queue(
                            broker,
                            name.clone(),
                            m.durable,
                            m.auto_delete,
                            m.exclusive.then_some(conn),
                            args,
                            m.arguments.clone(),
                        )
                        .await?
                }
            };
            let mut st = q.state.lock();
            st.queue.touch(now_ms());
            (q.name.clone(), st.queue.ready_count(), st.consumers.len())
        };
        self.last_queue = queue.clone();
        if !m.nowait {
            self.shared
                .write_method(&Method::QueueDeclareOk(QueueDeclareOk {
                    queue,
                    message_count: messages as u32,
                    consumer_count: consumers as u32,
                }));
        }
        Ok(())
    }

    async fn handle_queue_delete(
        &mut self,
        broker: &Arc<Broker>,
        vhost: &Vhost,
        m: amqp_codec::methods::QueueDelete,
    ) -> Result<(), AmqpError> {
        self.allow(broker, vhost, Resource::Queue, &m.queue, Access::Configure)?;
        let count = match vhost.find_queue(&m.queue) {
            None => 0,
            Some(q) => {
                vhost.check_exclusive(&q, self.shared.connection.id)?;
                {
                    let st = q.state.lock();
                    if m.if_unused && !st.consumers.is_empty() {
                        return Err(AmqpError::precondition_failed(format!(
                            "queue '{}' in vhost '{}' in use",
                            q.name,
                            vhost.name()
                        )));
                    }
                    if m.if_empty && st.queue.ready_count() > 0 {
                        return Err(AmqpError::precondition_failed(format!(
                            "queue '{}' in vhost '{}' not empty",
                            q.name,
                            vhost.name()
                        )));
                    }
                }
                self.consumers.retain(|(_, cq)| cq.id != q.id);
                vhost.delete_queue(broker, &q, false).await?
            }
        };
        if !m.nowait {
            self.shared
                .write_method(&Method::QueueDeleteOk(QueueDeleteOk {
                    message_count: count as u32,
                }));
        }
        Ok(())
    }

    fn handle_basic_consume(
        &mut self,
        broker: &Arc<Broker>,
        vhost: &Vhost,
        m: BasicConsume,
    ) -> Result<(), AmqpError> {
        if m.queue.as_str() == reply_to::PSEUDO_QUEUE {
            return self.consume_replies(broker, m);
        }
        self.allow(broker, vhost, Resource::Queue, &m.queue, Access::Read)?;
        let shared = self.shared.clone();
        self.consumers.retain(|(t, _)| shared.has_consumer(t));
        let queue = vhost.queue_for(&m.queue, self.shared.connection.id)?;
        let tag = if m.consumer_tag.is_empty() {
            server_name("amq.ctag-")
        } else {
            m.consumer_tag.clone()
        };
        if self.consumers.iter().any(|(t, _)| *t == tag) {
            return Err(AmqpError::not_allowed(format!(
                "attempt to reuse consumer tag '{tag}'"
            )));
        }
        let max = broker.config.max_consumers_per_channel;
        if max > 0 && self.consumers.len() >= max {
            return Err(AmqpError::precondition_failed(format!(
                "reached the limit of {max} consumers per channel"
            )));
        }
        let priority = match m.arguments.get("x-priority") {
            None => 0,
            Some(v) => match v.as_i64() {
                Some(p) => p.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32,
                None => {
                    return Err(AmqpError::precondition_failed(format!(
                        "invalid arg 'x-priority' for queue '{}' in vhost '{}': {{unacceptable_type,{}}}",
                        queue.name,
                        vhost.name(),
                        queue_store::args::type_name(v)
                    )));
                }
            },
        };
        {
            let mut st = queue.state.lock();
            if st.deleted {
                return Err(AmqpError::not_found(format!(
                    "no queue '{}' in vhost '{}'",
                    queue.name,
                    vhost.name()
                )));
            }
            if st.consumers.iter().any(|c| c.exclusive) || (m.exclusive && !st.consumers.is_empty())
            {
                return Err(AmqpError::access_refused(format!(
                    "queue '{}' in vhost '{}' in exclusive use",
                    queue.name,
                    vhost.name()
                )));
            }
            if !m.nowait {
                self.shared
                    .write_method(&Method::BasicConsumeOk(BasicConsumeOk {
                        consumer_tag: tag.clone(),
                    }));
            }
            st.consumers.push(Consumer {
                tag: tag.clone(),
                channel: self.shared.clone(),
                no_ack: m.no_ack,
                prefetch: self.prefetch,
                unacked: Arc::new(AtomicU32::new(0)),
                exclusive: m.exclusive,
                priority,
            });
            st.queue.touch(now_ms());
        }
        self.shared
            .deliveries
            .lock()
            .consumers
            .insert(tag.clone(), queue.id);
        self.consumers.push((tag, queue.clone()));
        vhost.dispatch(broker, &queue);
        Ok(())
    }

    /// `basic.consume` from `amq.rabbitmq.reply-to`.
    fn consume_replies(&mut self, broker: &Arc<Broker>, m: BasicConsume) -> Result<(), AmqpError> {
        if !m.no_ack {
            return Err(AmqpError::precondition_failed(
                "reply consumer cannot acknowledge",
            ));
        }
        if self.reply_consumer.is_some() {
            return Err(AmqpError::precondition_failed("reply consumer already set"));
        }
        let tag = if m.consumer_tag.is_empty() {
            server_name("amq.ctag-")
        } else {
            m.consumer_tag.clone()
        };
        let token = broker
            .reply_consumers
            .register(self.shared.clone(), tag.clone());
        self.reply_consumer = Some((token, tag.clone()));
        if !m.nowait {
            self.shared
                .write_method(&Method::BasicConsumeOk(BasicConsumeOk {
                    consumer_tag: tag,
                }));
        }
        Ok(())
    }

    fn handle_basic_get(
        &mut self,
        broker: &Arc<Broker>,
        vhost: &Vhost,
        m: BasicGet,
    ) -> Result<(), AmqpError> {
        self.allow(broker, vhost, Resource::Queue, &m.queue, Access::Read)?;
        let queue = vhost.queue_for(&m.queue, self.shared.connection.id)?;
        let mut fx = std::mem::take(&mut self.fx);
        let got = {
            let mut st = queue.state.lock();
            st.queue.touch(now_ms());
            let got = st.queue.deliver(now_ms(), !m.no_ack, &mut fx);
            if got.is_some() {
                queue.stats.delivered.fetch_add(1, Ordering::Relaxed);
            }
            got
        };
        match got {
            None => self
                .shared
                .write_method(&Method::BasicGetEmpty(BasicGetEmpty {
                    cluster_id: ShortStr::default(),
                })),
            Some(d) => match crate::queue::load(&d.message, &broker.store) {
                Some(msg) => {
                    let tag = self.shared.next_delivery((!m.no_ack).then(|| Unacked {
                        queue: queue.id,
                        seq: d.seq,
                        consumer_unacked: None,
                        consumer: None,
                        delivered_at: now_ms(),
                    }));
                    let method = Method::BasicGetOk(BasicGetOk {
                        delivery_tag: tag,
                        redelivered: d.redelivered,
                        exchange: msg.exchange.clone(),
                        routing_key: msg.routing_key.clone(),
                        message_count: d.remaining as u32,
                    });
                    let header = crate::queue::with_delivery_count(&msg.header, d.delivery_count);
                    self.shared.write_content(&method, &header, &msg.body);
                    if queue.tracer.is_on() {
                        self.shared.trace_delivery(&queue, &msg, d.redelivered);
                    }
                }
                None => self
                    .shared
                    .write_method(&Method::BasicGetEmpty(BasicGetEmpty {
                        cluster_id: ShortStr::default(),
                    })),
            },
        }
        vhost.apply(broker, &mut fx);
        self.fx = fx;
        Ok(())
    }

    /// Routes and enqueues one publish (outside a transaction, or at commit).
    fn publish(
        &mut self,
        broker: &Arc<Broker>,
        vhost: &Vhost,
        m: BasicPublish,
        header: ContentHeader,
        body: Bytes,
    ) -> Result<(), AmqpError> {
        let seq = self.confirms.as_mut().map(|c| {
            c.published += 1;
            c.published
        });
        self.shared
            .connection
            .has_published
            .store(true, Ordering::Relaxed);
        // Permissions first, as RabbitMQ checks them: replies through direct
        // reply-to go via the default exchange too and need write access to it.
        self.allow(
            broker,
            vhost,
            Resource::Exchange,
            &m.exchange,
            Access::Write,
        )?;
        vhost.check_topic(
            &broker.auth,
            &self.shared.connection.user,
            &m.exchange,
            &m.routing_key,
            Access::Write,
        )?;
        if let Some(exp) = header.properties.expiration() {
            if parse_expiration(&exp).is_none() {
                let reason = if exp.starts_with('-') {
                    format!("{{value_negative,{exp}}}")
                } else if exp.bytes().all(|b| b.is_ascii_digit()) && !exp.is_empty() {
                    format!("{{value_too_large,{exp}}}")
                } else {
                    "{error,{invalid_format}}".to_owned()
                };
                return Err(AmqpError::precondition_failed(format!(
                    "invalid expiration '{exp}': {reason}"
                )));
            }
        }
        crate::vhost::check_user_id(
            header.properties.user_id().as_ref().map(ShortStr::as_str),
            &self.shared.connection.user,
            &broker.auth,
        )?;
        let header = match header.properties.reply_to() {
            Some(r) if r.as_str() == reply_to::PSEUDO_QUEUE => {
                let Some((token, _)) = &self.reply_consumer else {
                    return Err(AmqpError::precondition_failed(
                        "fast reply consumer does not exist",
                    ));
                };
                with_reply_to(header, reply_to::reply_address(token))
            }
            _ => header,
        };
        if m.exchange.is_empty() && m.routing_key.starts_with(reply_to::PSEUDO_QUEUE) {
            let delivered = broker
                .reply_consumers
                .deliver(&m.routing_key, &header, &body);
            if !delivered && m.mandatory {
                self.shared.write_content(
                    &Method::BasicReturn(BasicReturn {
                        reply_code: reply_code::NO_ROUTE,
                        reply_text: ShortStr::from_static("NO_ROUTE"),
                        exchange: m.exchange,
                        routing_key: m.routing_key,
                    }),
                    &header,
                    &body,
                );
            }
            return Ok(());
        }
        let headers = if header.properties.has(amqp_codec::Property::Headers) {
            header.properties.headers().ok().flatten()
        } else {
            None
        };
        let mut fx = std::mem::take(&mut self.fx);
        let published = vhost.enqueue(
            broker,
            Publish {
                exchange: &m.exchange,
                routing_key: &m.routing_key,
                mandatory: m.mandatory,
                header,
                headers,
                body,
                publisher: crate::trace::Party {
                    connection: &self.shared.connection.name,
                    channel: self.shared.id,
                    user: &self.shared.connection.user,
                },
            },
            &mut self.routed,
            &mut fx,
        );
        self.fx = fx;
        let Enqueue {
            message,
            refused,
            wrote,
            unroutable,
            congested,
        } = published?;
        for gate in &congested {
            self.shared.connection.note_congested(gate);
        }
        if unroutable && m.mandatory {
            self.shared.write_content(
                &Method::BasicReturn(BasicReturn {
                    reply_code: reply_code::NO_ROUTE,
                    reply_text: ShortStr::from_static("NO_ROUTE"),
                    exchange: m.exchange,
                    routing_key: m.routing_key,
                }),
                &message.header,
                &message.body,
            );
        }
        if let (Some(c), Some(seq)) = (self.confirms.as_mut(), seq) {
            c.needs_sync |= wrote;
            if refused {
                c.nacked.push(seq);
            }
        }
        Ok(())
    }

    fn commit(
        &mut self,
        broker: &Arc<Broker>,
        vhost: &Vhost,
        actions: Vec<TxAction>,
    ) -> Result<(), AmqpError> {
        for a in actions {
            match a {
                TxAction::Publish(m, header, body) => {
                    self.publish(broker, vhost, m, header, body)?
                }
                TxAction::Settle(tags, how) => {
                    let taken = self.shared.take_held(&tags);
                    self.settle(broker, vhost, taken, how);
                }
            }
        }
        Ok(())
    }

    /// Sends the confirms for publishes handled since the last call: at once,
    /// or after the store's commit point if any of them (or an earlier batch
    /// still waiting) wrote to the store.
    pub fn flush_confirms(&mut self, broker: &Arc<Broker>) {
        if self.state == State::Closing {
            return;
        }
        let Some(c) = self.confirms.as_mut() else {
            return;
        };
        if c.published == c.confirmed {
            return;
        }
        let (from, to) = (c.confirmed, c.published);
        c.confirmed = to;
        let nacked = std::mem::take(&mut c.nacked);
        let frames = confirm_frames(from, to, &nacked);
        let wait = std::mem::take(&mut c.needs_sync) || c.in_flight.load(Ordering::Acquire) > 0;
        let confirmed = (to - from).saturating_sub(nacked.len() as u64);
        if !wait {
            for f in &frames {
                self.shared.write_method(f);
            }
            broker.metrics.confirmed.inc_by(confirmed);
            return;
        }
        let metrics = broker.metrics.clone();
        c.in_flight.fetch_add(1, Ordering::AcqRel);
        let in_flight = c.in_flight.clone();
        let commit = broker.store.commit();
        let shared = self.shared.clone();
        let previous = c.previous.take();
        let (done, next) = tokio::sync::oneshot::channel();
        c.previous = Some(next);
        broker.tracker.spawn(async move {
            let result = commit.await;
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            // Nothing is written once the channel closed (its close-ok went
            // out, and its number may already be reused).
            match result {
                Ok(()) => {
                    if shared.write_methods_if_open(&frames) {
                        metrics.confirmed.inc_by(confirmed);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "commit failed: nacking publishes");
                    shared.write_methods_if_open(&[Method::BasicNack(BasicNack {
                        delivery_tag: to,
                        multiple: true,
                        requeue: false,
                    })]);
                }
            }
            in_flight.fetch_sub(1, Ordering::AcqRel);
            let _ = done.send(());
        });
    }
}

/// The frames confirming publishes `from+1 ..= to`, with `nacked` refused:
/// multiple acks for the runs between refusals, a single nack for each.
fn confirm_frames(from: u64, to: u64, nacked: &[u64]) -> Vec<Method> {
    let mut frames = Vec::new();
    let mut last = from;
    for &n in nacked {
        if n > last + 1 {
            frames.push(Method::BasicAck(BasicAck {
                delivery_tag: n - 1,
                multiple: true,
            }));
        }
        frames.push(Method::BasicNack(BasicNack {
            delivery_tag: n,
            multiple: false,
            requeue: false,
        }));
        last = n;
    }
    if to > last {
        frames.push(Method::BasicAck(BasicAck {
            delivery_tag: to,
            multiple: to - last > 1,
        }));
    }
    frames
}

/// A name without `\r` and `\n` (RabbitMQ strips them from declared
/// names, so they never reach a log line either). No copy when there are none.
fn strip_cr_lf(name: ShortStr) -> ShortStr {
    if !name.bytes().any(|b| b == b'\r' || b == b'\n') {
        return name;
    }
    let kept: String = name.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    ShortStr::try_from(kept).unwrap_or_default()
}

/// The header with its `reply-to` property replaced.
fn with_reply_to(header: ContentHeader, reply_to: ShortStr) -> ContentHeader {
    let Ok(mut props) = header.properties.decode() else {
        return header;
    };
    props.reply_to = Some(reply_to);
    match props.to_raw() {
        Ok(properties) => ContentHeader {
            properties,
            ..header
        },
        Err(_) => header,
    }
}

/// The 406 for redeclaring `q` with different properties or arguments.
pub(crate) fn check_equivalent(
    q: &QueueHandle,
    m: &QueueDeclare,
    vhost: &str,
) -> Result<(), AmqpError> {
    let ineq = |arg: &str, received: String, current: String| {
        AmqpError::precondition_failed(format!(
            "inequivalent arg '{arg}' for queue '{}' in vhost '{vhost}': received {received} but current is {current}",
            q.name
        ))
    };
    if q.durable != m.durable {
        return Err(ineq(
            "durable",
            format!("'{}'", m.durable),
            format!("'{}'", q.durable),
        ));
    }
    if q.auto_delete != m.auto_delete {
        return Err(ineq(
            "auto_delete",
            format!("'{}'", m.auto_delete),
            format!("'{}'", q.auto_delete),
        ));
    }
    if let Some((arg, received, current)) = first_difference(&q.arguments, &m.arguments) {
        return Err(ineq(arg, received, current));
    }
    Ok(())
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

impl Settle {
    /// `basic.nack` / `basic.reject`'s `requeue` flag.
    fn requeue_or_reject(requeue: bool) -> Settle {
        if requeue {
            Settle::Requeue
        } else {
            Settle::Reject
        }
    }
}

/// What a handled command did to the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelOutcome {
    /// Still open.
    Open,
    /// Closed (close-ok sent or received): forget it.
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirm_frames_coalesce_runs_around_nacks() {
        let f = confirm_frames(0, 5, &[]);
        assert_eq!(
            f,
            [Method::BasicAck(BasicAck {
                delivery_tag: 5,
                multiple: true
            })]
        );
        let f = confirm_frames(5, 6, &[]);
        assert_eq!(
            f,
            [Method::BasicAck(BasicAck {
                delivery_tag: 6,
                multiple: false
            })]
        );
        let f = confirm_frames(0, 6, &[3]);
        assert_eq!(
            f,
            [
                Method::BasicAck(BasicAck {
                    delivery_tag: 2,
                    multiple: true
                }),
                Method::BasicNack(BasicNack {
                    delivery_tag: 3,
                    multiple: false,
                    requeue: false
                }),
                Method::BasicAck(BasicAck {
                    delivery_tag: 6,
                    multiple: true
                }),
            ]
        );
        let f = confirm_frames(2, 3, &[3]);
        assert_eq!(
            f,
            [Method::BasicNack(BasicNack {
                delivery_tag: 3,
                multiple: false,
                requeue: false
            })]
        );
    }
}
