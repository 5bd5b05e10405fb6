//! `basic.*`: qos, consume (and direct reply-to), cancel, publish, get,
//! ack/nack/reject (settled at once or held by a transaction), recover,
//! and the consumer (acknowledgement) timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use amqp_codec::methods::*;
use amqp_codec::{Content, ContentHeader, FieldValue, Method, ShortStr, reply_code};
use bytes::Bytes;
use queue_store::parse_expiration;

use super::{Channel, Mode, Settle, TxAction, Unacked, server_name};
use crate::auth::{Access, Resource};
use crate::error::AmqpError;
use crate::metrics::DeliveryKind;
use crate::node::Node;
use crate::queue::{ConsumeRefused, Consumer, now_ms};
use crate::reply_to;
use crate::vhost::{Enqueue, Publish, Vhost};

impl Channel {
    pub(super) fn handle_basic_qos(
        &mut self,
        _node: &Arc<Node>,
        vhost: &Vhost,
        m: BasicQos,
    ) -> Result<(), AmqpError> {
        if m.prefetch_size != 0 {
            return Err(AmqpError::not_implemented(format!(
                "prefetch_size!=0 ({})",
                m.prefetch_size
            )));
        }
        if m.global {
            self.shared.set_global_prefetch(m.prefetch_count);
        } else {
            self.prefetch = m.prefetch_count;
            self.shared.note_prefetch(m.prefetch_count);
        }
        self.shared.write_method(&Method::BasicQosOk(BasicQosOk {}));
        self.dispatch_all(vhost);
        Ok(())
    }

    pub(super) fn handle_basic_cancel(&mut self, node: &Arc<Node>, vhost: &Vhost, m: BasicCancel) {
        if self
            .reply_consumer
            .as_ref()
            .is_some_and(|(_, t)| *t == m.consumer_tag)
        {
            if let Some((token, _)) = self.reply_consumer.take() {
                node.reply_consumers.unregister(&token);
            }
        }
        if let Some(pos) = self
            .consumers
            .iter()
            .position(|(t, _)| *t == m.consumer_tag)
        {
            let (tag, queue) = self.consumers.remove(pos);
            self.shared.forget_consumer(&tag);
            vhost.cancel_consumer(&queue, &tag);
        }
        if let Some(pos) = self
            .remote_consumers
            .iter()
            .position(|(t, _, _)| *t == m.consumer_tag)
        {
            let (tag, home, key) = self.remote_consumers.remove(pos);
            self.shared.forget_consumer(&tag);
            if let Some(peers) = node.peers.get() {
                peers.cancel(&home, key);
            }
        }
        if !m.nowait {
            self.shared
                .write_method(&Method::BasicCancelOk(BasicCancelOk {
                    consumer_tag: m.consumer_tag,
                }));
        }
    }

    pub(super) fn handle_basic_publish(
        &mut self,
        node: &Arc<Node>,
        vhost: &Vhost,
        m: BasicPublish,
        content: Option<Content>,
    ) -> Result<(), AmqpError> {
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
        if matches!(self.mode, Mode::Transactional(_)) {
            // RabbitMQ refuses these at once, not at commit.
            self.check_publish(node, vhost, &m)?;
        }
        match &mut self.mode {
            Mode::Transactional(actions) => {
                actions.push(TxAction::Publish(m, content.header, content.body));
                self.shared
                    .uncommitted_publishes
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            _ => self.publish(node, vhost, m, content.header, content.body),
        }
    }

    pub(super) fn handle_basic_ack(
        &mut self,
        _node: &Arc<Node>,
        vhost: &Vhost,
        m: BasicAck,
    ) -> Result<(), AmqpError> {
        self.settle_or_hold(vhost, m.delivery_tag, m.multiple, Settle::Ack)
    }

    pub(super) fn handle_basic_nack(
        &mut self,
        _node: &Arc<Node>,
        vhost: &Vhost,
        m: BasicNack,
    ) -> Result<(), AmqpError> {
        let how = Settle::requeue_or_reject(m.requeue);
        self.settle_or_hold(vhost, m.delivery_tag, m.multiple, how)
    }

    pub(super) fn handle_basic_reject(
        &mut self,
        _node: &Arc<Node>,
        vhost: &Vhost,
        m: BasicReject,
    ) -> Result<(), AmqpError> {
        let how = Settle::requeue_or_reject(m.requeue);
        self.settle_or_hold(vhost, m.delivery_tag, false, how)
    }

    pub(super) fn handle_basic_recover(
        &mut self,
        _node: &Arc<Node>,
        vhost: &Vhost,
        m: BasicRecover,
    ) -> Result<(), AmqpError> {
        if !m.requeue {
            return Err(AmqpError::not_implemented("requeue=false"));
        }
        let unacked = self.shared.take_outstanding();
        vhost.settle(unacked, Settle::Requeue);
        self.shared
            .write_method(&Method::BasicRecoverOk(BasicRecoverOk {}));
        Ok(())
    }

    /// As RabbitMQ: redelivering to the same consumer is not offered.
    pub(super) fn handle_basic_recover_async(
        &mut self,
        _node: &Arc<Node>,
        vhost: &Vhost,
        m: BasicRecoverAsync,
    ) -> Result<(), AmqpError> {
        if !m.requeue {
            return Err(AmqpError::not_implemented("requeue=false"));
        }
        let unacked = self.shared.take_outstanding();
        vhost.settle(unacked, Settle::Requeue);
        Ok(())
    }

    pub(super) async fn handle_basic_consume(
        &mut self,
        node: &Arc<Node>,
        vhost: &Vhost,
        m: BasicConsume,
    ) -> Result<(), AmqpError> {
        if m.queue.as_str() == reply_to::PSEUDO_QUEUE {
            return self.consume_replies(node, m);
        }
        self.allow(node, vhost, Resource::Queue, &m.queue, Access::Read)?;
        let shared = self.shared.clone();
        self.consumers.retain(|(t, _)| shared.has_consumer(t));
        self.remote_consumers
            .retain(|(t, _, _)| shared.has_consumer(t));
        let queue = match vhost.queue_for(&m.queue, self.shared.connection.id) {
            Ok(q) => Ok(q),
            Err(e) => match vhost.usable_remote_queue(&m.queue)? {
                Some(remote) => Err(remote),
                None => return Err(e),
            },
        };
        let (queue_name, declared) = match &queue {
            Ok(q) => (q.name.clone(), &q.arguments),
            Err(remote) => (remote.name.clone(), &*remote.arguments),
        };
        if matches!(declared.get("x-queue-type"), Some(FieldValue::LongStr(t)) if &t[..] == b"quorum")
        {
            quorum_consume_rules(&queue_name, vhost.name(), &m, self.shared.global_prefetch())?;
        }
        let tag = if m.consumer_tag.is_empty() {
            server_name("amq.ctag-")
        } else {
            m.consumer_tag.clone()
        };
        if self.consumers.iter().any(|(t, _)| *t == tag)
            || self.remote_consumers.iter().any(|(t, _, _)| *t == tag)
        {
            return Err(AmqpError::not_allowed(format!(
                "attempt to reuse consumer tag '{tag}'"
            )));
        }
        let max = node.config.max_consumers_per_channel;
        if max > 0 && self.consumers.len() + self.remote_consumers.len() >= max {
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
                        queue_name,
                        vhost.name(),
                        queue_store::args::type_name(v)
                    )));
                }
            },
        };
        let queue = match queue {
            Ok(q) => q,
            Err(remote) => {
                return self
                    .consume_remote(node, vhost, m, remote, tag, priority)
                    .await;
            }
        };
        let consumer = Consumer {
            tag: tag.clone(),
            sink: self.shared.clone(),
            no_ack: m.no_ack,
            prefetch: self.prefetch,
            unacked: Arc::new(AtomicU32::new(0)),
            exclusive: m.exclusive,
            priority,
        };
        let shared = &self.shared;
        let attached = queue.kind().consume(consumer, &mut || {
            if !m.nowait {
                shared.write_method(&Method::BasicConsumeOk(BasicConsumeOk {
                    consumer_tag: tag.clone(),
                }));
            }
        });
        match attached {
            Ok(()) => {}
            Err(ConsumeRefused::Deleted) => {
                return Err(AmqpError::not_found(format!(
                    "no queue '{}' in vhost '{}'",
                    queue.name,
                    vhost.name()
                )));
            }
            Err(ConsumeRefused::InExclusiveUse) => {
                return Err(AmqpError::access_refused(format!(
                    "queue '{}' in vhost '{}' in exclusive use",
                    queue.name,
                    vhost.name()
                )));
            }
        }
        self.shared.add_consumer(tag.clone(), queue.id);
        self.consumers.push((tag, queue.clone()));
        vhost.dispatch(&queue);
        Ok(())
    }

    /// `basic.consume` of a queue on another node.
    async fn consume_remote(
        &mut self,
        node: &Arc<Node>,
        vhost: &Vhost,
        m: BasicConsume,
        remote: crate::peers::RemoteQueue,
        tag: ShortStr,
        priority: i32,
    ) -> Result<(), AmqpError> {
        let Some(peers) = node.peers.get().cloned() else {
            return Err(AmqpError::not_found(format!(
                "no queue '{}' in vhost '{}'",
                remote.name,
                vhost.name()
            )));
        };
        let sink = Arc::new_cyclic(|me| super::remote::RemoteConsumer {
            acks: parking_lot::Mutex::default(),
            ack_timer: std::sync::atomic::AtomicBool::new(false),
            me: me.clone(),
            channel: Arc::downgrade(&self.shared),
            tag: tag.clone(),
            queue_id: remote.id,
            queue: remote.name.clone(),
            vhost: vhost.name().to_owned(),
            home: remote.home.clone(),
            no_ack: m.no_ack,
            peers: peers.clone(),
            unacked: Arc::new(AtomicU32::new(0)),
            early: parking_lot::Mutex::new(Some(Vec::new())),
        });
        // Known to the channel first: deliveries may arrive before the
        // answer (they wait for consume-ok in the sink).
        self.shared.add_consumer(tag.clone(), remote.id);
        let consume = crate::peers::RemoteConsume {
            vhost: vhost.name().to_owned(),
            queue: remote.name.clone(),
            prefetch: if m.no_ack {
                super::remote::NO_ACK_WINDOW
            } else {
                // A channel-wide (global) limit bounds each remote consumer
                // on its own: its home node knows no other consumer of this
                // channel. (RabbitMQ bounds them together.)
                match (self.prefetch, self.shared.global_prefetch()) {
                    (own, 0) => own,
                    (0, global) => global,
                    (own, global) => own.min(global),
                }
            },
            exclusive: m.exclusive,
            priority,
            cancel_on_failover: matches!(
                m.arguments.get("x-cancel-on-ha-failover"),
                Some(amqp_codec::FieldValue::Bool(true))
            ),
            client: crate::peers::RemoteClient {
                tag: tag.to_string(),
                connection_name: self.shared.connection.name.clone(),
                channel: self.shared.id,
                peer: self.shared.connection.peer.to_string(),
                user: self.shared.connection.user.clone(),
            },
        };
        let as_sink: Arc<dyn crate::peers::RemoteSink> = sink.clone();
        let key = match peers.consume(&remote.home, consume, as_sink).await {
            Ok(key) => key,
            Err(e) => {
                self.shared.forget_consumer(&tag);
                return Err(if e.contains("exclusive use") {
                    AmqpError::access_refused(e)
                } else {
                    remote.home_down(vhost.name(), "consume", &e)
                });
            }
        };
        if !m.nowait {
            self.shared
                .write_method(&Method::BasicConsumeOk(BasicConsumeOk {
                    consumer_tag: tag.clone(),
                }));
        }
        self.remote_consumers.push((tag, remote.home, key));
        sink.activate();
        Ok(())
    }

    /// `basic.consume` from `amq.rabbitmq.reply-to`.
    pub(super) fn consume_replies(
        &mut self,
        node: &Arc<Node>,
        m: BasicConsume,
    ) -> Result<(), AmqpError> {
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
        let token = node
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

    pub(super) async fn handle_basic_get(
        &mut self,
        node: &Arc<Node>,
        vhost: &Vhost,
        m: BasicGet,
    ) -> Result<(), AmqpError> {
        self.allow(node, vhost, Resource::Queue, &m.queue, Access::Read)?;
        let queue = match vhost.queue_for(&m.queue, self.shared.connection.id) {
            Ok(q) => q,
            Err(e) => match (vhost.usable_remote_queue(&m.queue)?, node.peers.get()) {
                (Some(remote), Some(peers)) => {
                    return self
                        .get_remote(peers.as_ref(), vhost, remote, m.no_ack)
                        .await;
                }
                _ => return Err(e),
            },
        };
        let mut fx = std::mem::take(&mut self.fx);
        let got = queue.get(!m.no_ack, &mut fx);
        match got {
            None => self.get_empty(),
            Some(d) => match crate::queue::load_off_worker(&d.message, &node.store).await {
                Some(msg) => {
                    let unacked = (!m.no_ack).then(|| Unacked {
                        queue: queue.id,
                        seq: d.seq,
                        consumer_unacked: None,
                        consumer: None,
                        delivered_at: now_ms(),
                    });
                    let tag = self
                        .shared
                        .next_delivery(DeliveryKind::Get, d.redelivered, unacked);
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
                None => self.get_empty(),
            },
        }
        vhost.apply(&mut fx);
        self.fx = fx;
        Ok(())
    }

    /// Routes and enqueues one publish (outside a transaction, or at commit).
    pub(super) fn publish(
        &mut self,
        node: &Arc<Node>,
        vhost: &Vhost,
        m: BasicPublish,
        header: ContentHeader,
        body: Bytes,
    ) -> Result<(), AmqpError> {
        let seq = match &mut self.mode {
            Mode::Confirm(c) => {
                c.published += 1;
                node.metrics.received_confirm.inc();
                Some(c.published)
            }
            _ => None,
        };
        self.shared.note_published(seq.is_some());
        self.shared
            .connection
            .has_published
            .store(true, Ordering::Relaxed);
        // Permissions first, as RabbitMQ checks them: replies through direct
        // reply-to go via the default exchange too and need write access to it.
        self.allow(node, vhost, Resource::Exchange, &m.exchange, Access::Write)?;
        vhost.check_topic(
            &node.auth,
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
            &node.auth,
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
            let delivered = node.reply_consumers.deliver(&m.routing_key, &header, &body);
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
            remote,
        } = published?;
        for gate in &congested {
            self.shared.connection.note_congested(gate);
        }
        if unroutable {
            let which = if m.mandatory {
                crate::session::stat::RETURN_UNROUTABLE
            } else {
                crate::session::stat::DROP_UNROUTABLE
            };
            self.shared.stats.add(which, 1);
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
        match (&mut self.mode, seq) {
            (Mode::Confirm(c), Some(seq)) => {
                c.needs_sync |= wrote;
                if refused {
                    c.nacked.push(seq);
                }
                c.remote.extend(remote.into_iter().map(|r| (seq, r)));
            }
            // Published by `tx.commit`, whose commit-ok waits for them.
            (Mode::Transactional(_), _) => self.tx_remote.extend(remote),
            // Otherwise nothing waits for the remote enqueues: a failed one
            // is logged by the cluster's link when its answer comes.
            _ => {}
        }
        Ok(())
    }

    /// Answers `basic.get` with `get-empty` (and counts it).
    fn get_empty(&self) {
        self.shared.connection.metrics.get_empty.inc();
        self.shared.stats.add(crate::session::stat::GET_EMPTY, 1);
        self.shared
            .write_method(&Method::BasicGetEmpty(BasicGetEmpty {
                cluster_id: ShortStr::default(),
            }));
    }

    /// `basic.get` from a queue on another node.
    async fn get_remote(
        &mut self,
        peers: &dyn crate::peers::Peers,
        vhost: &Vhost,
        remote: crate::peers::RemoteQueue,
        no_ack: bool,
    ) -> Result<(), AmqpError> {
        let got = peers
            .get(&remote.home, vhost.name(), &remote.name, !no_ack)
            .await
            .map_err(|e| remote.home_down(vhost.name(), "get", &e))?;
        let Some(d) = got else {
            self.get_empty();
            return Ok(());
        };
        let header = amqp_codec::ContentHeader::decode(&d.header).map_err(|e| {
            AmqpError::internal(format!("a message from node '{}': {e}", remote.home))
        })?;
        let unacked = (!no_ack).then(|| Unacked {
            queue: remote.id,
            seq: d.seq,
            consumer_unacked: None,
            consumer: None,
            delivered_at: now_ms(),
        });
        let tag = self
            .shared
            .next_delivery(DeliveryKind::Get, d.redelivered, unacked);
        let method = Method::BasicGetOk(BasicGetOk {
            delivery_tag: tag,
            redelivered: d.redelivered,
            exchange: d.exchange,
            routing_key: d.routing_key,
            message_count: d.remaining,
        });
        let header = crate::queue::with_delivery_count(&header, d.delivery_count);
        self.shared.write_content(&method, &header, &d.body);
        Ok(())
    }

    /// What a publish inside a transaction must pass at once (RabbitMQ refuses
    /// it then, not at commit): permission, an existing, non-internal exchange.
    pub(super) fn check_publish(
        &self,
        node: &Node,
        vhost: &Vhost,
        m: &BasicPublish,
    ) -> Result<(), AmqpError> {
        self.allow(node, vhost, Resource::Exchange, &m.exchange, Access::Write)?;
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

    /// Settles deliveries now, or, in a transaction, holds them (no longer
    /// outstanding for the channel, as in RabbitMQ) until commit.
    pub(super) fn settle_or_hold(
        &mut self,
        vhost: &Vhost,
        tag: u64,
        multiple: bool,
        how: Settle,
    ) -> Result<(), AmqpError> {
        if let Mode::Transactional(actions) = &mut self.mode {
            let tags = self.shared.hold(tag, multiple)?;
            actions.push(TxAction::Settle(tags, how));
            return Ok(());
        }
        let taken = self.shared.take(tag, multiple)?;
        self.settle(vhost, taken, how);
        Ok(())
    }

    /// Settles deliveries of this channel and lets queues deliver again.
    /// With a channel-wide prefetch, the credit that came back is offered to
    /// the channel's queues in turn, not first to the queues just settled
    /// (which would starve the others); those are dispatched after, for
    /// their consumers on other channels.
    pub(super) fn settle(&self, vhost: &Vhost, taken: Vec<Unacked>, how: Settle) {
        if matches!(how, Settle::Ack) {
            self.shared
                .stats
                .add(crate::session::stat::ACK, taken.len() as u64);
        }
        if self.shared.global_prefetch() == 0 {
            vhost.settle(taken, how);
            return;
        }
        let mut settled: Vec<u64> = taken.iter().map(|u| u.queue).collect();
        settled.sort_unstable();
        settled.dedup();
        vhost.settle_then(taken, how, false);
        self.dispatch_all(vhost);
        for id in settled {
            if let Some(q) = vhost.queue_by_id(id) {
                vhost.dispatch(&q);
            }
        }
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
        node: &Arc<Node>,
        vhost: &Vhost,
        now: u64,
    ) -> Result<(), AmqpError> {
        let default = node.config.consumer_timeout.as_millis() as u64;
        let oldest = self.shared.oldest_unacked();
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
            Some(tag) if node.config.consumer_timeout_cancels_consumer => {
                tracing::warn!(channel = self.shared.id, consumer = %tag, timeout, "consumer timed out: cancelling it");
                if let Some(pos) = self.consumers.iter().position(|(t, _)| *t == tag) {
                    let (tag, queue) = self.consumers.remove(pos);
                    vhost.cancel_consumer(&queue, &tag);
                }
                self.shared.forget_consumer(&tag);
                if self.shared.connection.cancel_notify {
                    self.shared.write_method(&Method::BasicCancel(BasicCancel {
                        consumer_tag: tag.clone(),
                        nowait: true,
                    }));
                }
                let theirs = self.shared.take_consumer(&tag);
                vhost.settle(theirs, Settle::Requeue);
                Ok(())
            }
            _ => Err(AmqpError::precondition_failed(format!(
                "delivery acknowledgement on channel {} timed out. Timeout value used: {timeout} ms. This timeout value can be configured, see consumers doc guide to learn more",
                self.shared.id
            ))),
        }
    }
}

/// The header with its `reply-to` property replaced.
fn with_reply_to(header: ContentHeader, reply_to: ShortStr) -> ContentHeader {
    header.with_properties(|p| p.reply_to = Some(reply_to))
}

/// What RabbitMQ 3.10 refuses when consuming from a quorum queue (recorded
/// in `crates/queue-store/tests/data/rabbitmq_3_10_quorum.md`): a channel
/// with a global prefetch (540, a connection error), and
/// `x-cancel-on-ha-failover`, a mirrored classic queue's argument (406).
fn quorum_consume_rules(
    queue: &str,
    vhost: &str,
    m: &BasicConsume,
    global_prefetch: u16,
) -> Result<(), AmqpError> {
    if global_prefetch > 0 {
        return Err(AmqpError::not_implemented(format!(
            "queue '{queue}' in vhost '{vhost}' does not support global qos"
        )));
    }
    if m.arguments.get("x-cancel-on-ha-failover").is_some() {
        return Err(AmqpError::precondition_failed(format!(
            "invalid arg 'x-cancel-on-ha-failover' for queue '{queue}' in vhost '{vhost}' of queue type rabbit_quorum_queue"
        )));
    }
    Ok(())
}
