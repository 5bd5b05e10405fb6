//! Consumers on this node's channels of queues that live on other nodes of
//! the cluster: [`RemoteConsumer`] is where the home node's deliveries
//! arrive (over the cluster link) and become `basic.deliver`s of the
//! channel, and how they are settled back.
//!
//! The home node runs the consumer with acknowledgements and the channel's
//! per-consumer prefetch; for a `no-ack` consumer this node acknowledges
//! each delivery once it is written to the client, and the home node's
//! prefetch is [`NO_ACK_WINDOW`], so a fast producer cannot flood the link.
//! Those acknowledgements are held back and go in one settle: at the end of
//! a burst (the deliveries that arrived in one read of the link) once
//! [`ACK_BATCH`] are held, else [`ACK_DELAY`] after the first one held,
//! and always before the consumer's cancel. At low rates a settle per
//! delivery cost the home node a wake-up per message on the path of the
//! next one (measured: X4's p99 about 10% lower without it). The price: a
//! consumer whose node dies leaves up to that many deliveries it already
//! wrote unsettled, and the home queues them again (redelivered), where
//! RabbitMQ would have dropped them; and the home lists them as
//! unacknowledged for those few milliseconds.
//! Deliveries that arrive before `basic.consume-ok` is written wait for it;
//! ones that arrive after the consumer is gone go back to the queue.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use amqp_codec::ShortStr;
use amqp_codec::methods::*;
use amqp_codec::{ContentHeader, Method};
use parking_lot::Mutex;

use crate::metrics::DeliveryKind;
use crate::peers::{Peers, RemoteDelivery, RemoteSink};
use crate::queue::{Settle, Unacked};
use crate::session::ChannelShared;

/// The home node's prefetch for a remote `no-ack` consumer.
pub(super) const NO_ACK_WINDOW: u16 = 1024;

/// Held acknowledgements of a `no-ack` consumer sent at the end of a burst
/// (a quarter of the window: the home never waits for them).
const ACK_BATCH: usize = NO_ACK_WINDOW as usize / 4;

/// How long a `no-ack` consumer's first held acknowledgement waits for
/// more before they go.
const ACK_DELAY: Duration = Duration::from_millis(10);

/// A consumer of a queue on another node, as its channel here sees it.
pub(super) struct RemoteConsumer {
    /// A `no-ack` consumer's deliveries written and not yet acknowledged
    /// to the home node.
    pub(super) acks: Mutex<Vec<u64>>,
    /// A task will send `acks` after [`ACK_DELAY`].
    pub(super) ack_timer: AtomicBool,
    /// Itself (what that task holds).
    pub(super) me: Weak<RemoteConsumer>,
    pub(super) channel: std::sync::Weak<ChannelShared>,
    pub(super) tag: ShortStr,
    /// The remote queue's id in this vhost's router (what deliveries are
    /// recorded under, so their settlement goes to the home node).
    pub(super) queue_id: u64,
    pub(super) queue: ShortStr,
    pub(super) vhost: String,
    pub(super) home: String,
    pub(super) no_ack: bool,
    pub(super) peers: Arc<dyn Peers>,
    pub(super) unacked: Arc<AtomicU32>,
    /// Deliveries waiting for `basic.consume-ok`; `None` once it is out.
    pub(super) early: Mutex<Option<Vec<RemoteDelivery>>>,
}

impl RemoteConsumer {
    /// `basic.consume-ok` is out: what arrived before it goes now.
    pub(super) fn activate(&self) {
        let early = self.early.lock().take().unwrap_or_default();
        for d in early {
            self.write(d);
        }
        self.flush_acks();
    }

    fn give_back(&self, d: &RemoteDelivery) {
        self.peers.settle(
            &self.home,
            &self.vhost,
            &self.queue,
            self.queue_id,
            vec![d.seq],
            Settle::Requeue,
        );
    }

    fn write(&self, d: RemoteDelivery) {
        let Some(channel) = self.channel.upgrade() else {
            self.give_back(&d);
            return;
        };
        if !channel.has_consumer(&self.tag) {
            self.give_back(&d);
            return;
        }
        let Ok(header) = ContentHeader::decode(&d.header) else {
            tracing::warn!(queue = %self.queue, home = %self.home, "a delivery with an undecodable header: rejected");
            self.peers.settle(
                &self.home,
                &self.vhost,
                &self.queue,
                self.queue_id,
                vec![d.seq],
                Settle::Reject,
            );
            return;
        };
        let unacked = (!self.no_ack).then(|| Unacked {
            queue: self.queue_id,
            seq: d.seq,
            consumer_unacked: Some(self.unacked.clone()),
            consumer: Some(self.tag.clone()),
            delivered_at: crate::queue::now_ms(),
        });
        let tag = channel.next_delivery(DeliveryKind::Consume, d.redelivered, unacked);
        if !self.no_ack {
            self.unacked.fetch_add(1, Ordering::Relaxed);
        }
        let method = Method::BasicDeliver(BasicDeliver {
            consumer_tag: self.tag.clone(),
            delivery_tag: tag,
            redelivered: d.redelivered,
            exchange: d.exchange.clone(),
            routing_key: d.routing_key.clone(),
        });
        let header = crate::queue::with_delivery_count(&header, d.delivery_count);
        channel.write_content(&method, &header, &d.body);
        if self.no_ack {
            // Acknowledged with the rest of its burst (`end_of_burst`),
            // from the task that delivered it: no task of its own, whose
            // wake-up would cost more than the delivery at low rates.
            self.acks.lock().push(d.seq);
        }
    }

    fn flush_acks(&self) {
        let seqs = std::mem::take(&mut *self.acks.lock());
        if !seqs.is_empty() {
            self.peers.settle(
                &self.home,
                &self.vhost,
                &self.queue,
                self.queue_id,
                seqs,
                Settle::Ack,
            );
        }
    }
}

impl RemoteSink for RemoteConsumer {
    fn deliver(&self, d: RemoteDelivery) {
        {
            let mut early = self.early.lock();
            if let Some(waiting) = early.as_mut() {
                waiting.push(d);
                return;
            }
        }
        self.write(d);
    }

    fn end_of_burst(&self) {
        let held = self.acks.lock().len();
        if held >= ACK_BATCH {
            self.flush_acks();
            return;
        }
        if held == 0 || self.ack_timer.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.ack_timer.store(false, Ordering::Release);
            self.flush_acks();
            return;
        };
        // The task holds the consumer: an acknowledgement held just after
        // its cancel took the others still goes.
        let Some(consumer) = self.me.upgrade() else {
            self.ack_timer.store(false, Ordering::Release);
            self.flush_acks();
            return;
        };
        runtime.spawn(async move {
            tokio::time::sleep(ACK_DELAY).await;
            // Lowered first: an acknowledgement held after the take below
            // arms the next timer at its burst's end.
            consumer.ack_timer.store(false, Ordering::Release);
            consumer.flush_acks();
        });
    }

    fn settle_held(&self) {
        self.flush_acks();
    }

    fn cancelled(&self) {
        if let Some(channel) = self.channel.upgrade() {
            crate::queue::DeliverySink::cancelled_by_broker(channel.as_ref(), &self.tag);
        }
    }
}
