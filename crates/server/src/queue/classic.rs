//! The classic queue type: the store's [`Queue`] state machine and the
//! consumers behind one short-held lock, and the dispatch loop that hands
//! ready messages to consumers with credit, encoding each delivery straight
//! into the consuming connection's outbox.
//!
//! Nothing outside this file sees the lock or the state: the broker reaches
//! a classic queue through [`QueueType`].

use std::sync::Arc;
use std::sync::atomic::Ordering;

use amqp_codec::ShortStr;
use parking_lot::Mutex;
use queue_store::{
    Delivery, Effects, Enqueued, Message, MessageId, MessageRef, Queue, QueueArgs, SpillIo,
    SpillIoDone, Store,
};

use super::{
    ConsumeRefused, Consumer, ENTRY_OVERHEAD, Outgoing, Published, QueueCounters, QueueHandle,
    QueueType, SPILLED_ENTRY_OVERHEAD, Settle, now_ms,
};

/// Mutable state of a queue.
#[derive(Debug)]
struct QueueState {
    /// Messages.
    queue: Queue,
    /// Consumers in registration order.
    consumers: Vec<Consumer>,
    next_consumer: usize,
    /// Set once the queue is deleted; later operations are refused.
    deleted: bool,
    /// Dispatch stopped at a paged-out body: the housekeeping task loads the
    /// next ones off the lock ([`QueueType::wanted_page_in`]).
    page_in_wanted: bool,
    /// Paged bodies that could not be loaded: delivered (settled) in place
    /// rather than asked for again.
    unloadable: Vec<MessageId>,
    /// Deliveries left before the next page-in is asked for ahead of the
    /// head (while the queue has paged bodies).
    until_prefetch: usize,
    /// The housekeeping task was woken for spill I/O and has not taken it
    /// yet ([`QueueType::wanted_spill_io`]).
    spill_io_asked: bool,
    /// When a consumer could take a message at once (RabbitMQ's consumer
    /// utilisation), updated after every dispatch.
    deliverable: crate::rates::TimeInState,
}

/// How many paged bodies at the head are loaded at a time, and how many
/// octets of them at most.
const PAGE_IN_BATCH: usize = 1024;
const PAGE_IN_BYTES: u64 = 4 << 20;
/// How far past the head paged bodies are looked for: a batch is loaded
/// while the one before it is being delivered.
const PAGE_IN_SCAN: usize = 2 * PAGE_IN_BATCH;

/// A classic queue (or a quorum queue on a node alone, which keeps
/// RabbitMQ's quorum-queue rules but has one copy).
#[derive(Debug)]
pub struct ClassicQueue {
    state: Mutex<QueueState>,
    /// `classic`, or `quorum` for one declared with `x-queue-type: quorum`
    /// (the type RabbitMQ lists it under).
    type_name: &'static str,
}

impl ClassicQueue {
    /// Runs `f` under the queue's lock; wakes the housekeeping task if that
    /// moved the next TTL deadline (a new or requeued head, or a delivery
    /// that uncovered one) or left spill I/O to do, and only then: not on
    /// every publish.
    fn locked<R>(&self, q: &QueueHandle, f: impl FnOnce(&mut QueueState) -> R) -> R {
        let mut st = self.state.lock();
        let before = st.queue.next_expiry();
        let r = f(&mut st);
        let spill_io = !st.spill_io_asked && st.queue.take_spill_io_wanted();
        st.spill_io_asked |= spill_io;
        if spill_io || st.queue.next_expiry() != before {
            q.wake.notify_one();
        }
        r
    }

    /// Wraps the store's queue state machine.
    pub fn new(queue: Queue) -> ClassicQueue {
        let type_name = match queue.args().queue_type {
            queue_store::QueueType::Quorum => "quorum",
            queue_store::QueueType::Classic => "classic",
        };
        ClassicQueue {
            type_name,
            state: Mutex::new(QueueState {
                queue,
                consumers: Vec::new(),
                next_consumer: 0,
                deleted: false,
                page_in_wanted: false,
                unloadable: Vec::new(),
                until_prefetch: 0,
                spill_io_asked: false,
                deliverable: crate::rates::TimeInState::starting(now_ms()),
            }),
        }
    }
}

impl QueueType for ClassicQueue {
    fn type_name(&self) -> &'static str {
        self.type_name
    }

    fn counters(&self) -> QueueCounters {
        self.state.lock().counters()
    }

    fn take_utilisation(&self) -> f64 {
        let mut st = self.state.lock();
        // (A consumer that went without a dispatch after is seen here.)
        let deliverable = st.can_deliver_now();
        let now = now_ms();
        st.deliverable.set(deliverable, || now);
        st.deliverable.take(now)
    }

    fn touch(&self) -> Option<QueueCounters> {
        let mut st = self.state.lock();
        if st.deleted {
            return None;
        }
        st.queue.touch(now_ms());
        Some(st.counters())
    }

    fn publish(
        &self,
        q: &QueueHandle,
        message: &Arc<Message>,
        store: &Store,
        fx: &mut Effects,
    ) -> Option<Published> {
        self.locked(q, |st| {
            if st.deleted {
                return None;
            }
            let (outcome, wrote) = st.publish(q, message, store, fx);
            // (Measured only where a flow limit is set: not on every publish.)
            let congested = q.flow_limit > 0 && q.check_flow(st.ready_memory());
            Some(Published {
                refused: outcome == Enqueued::Rejected,
                wrote,
                congested,
            })
        })
    }

    fn consume(
        &self,
        consumer: Consumer,
        accepted: &mut dyn FnMut(),
    ) -> Result<(), ConsumeRefused> {
        let mut st = self.state.lock();
        if st.deleted {
            return Err(ConsumeRefused::Deleted);
        }
        if st.consumers.iter().any(|c| c.exclusive)
            || (consumer.exclusive && !st.consumers.is_empty())
        {
            return Err(ConsumeRefused::InExclusiveUse);
        }
        // Under the lock: consume-ok goes out before any delivery.
        accepted();
        st.consumers.push(consumer);
        st.queue.touch(now_ms());
        Ok(())
    }

    fn cancel(&self, tag: &ShortStr) -> bool {
        let mut st = self.state.lock();
        let before = st.consumers.len();
        st.consumers.retain(|c| c.tag != *tag);
        st.queue.touch(now_ms());
        before > 0 && st.consumers.is_empty()
    }

    fn take_consumers(&self) -> Vec<Consumer> {
        let mut st = self.state.lock();
        st.queue.touch(now_ms());
        std::mem::take(&mut st.consumers)
    }

    fn for_each_consumer(&self, f: &mut dyn FnMut(&Consumer)) {
        self.state.lock().consumers.iter().for_each(f);
    }

    fn get(&self, q: &QueueHandle, ack: bool, fx: &mut Effects) -> Option<Delivery> {
        self.locked(q, |st| {
            let now = now_ms();
            st.queue.touch(now);
            let got = st.queue.deliver(now, ack, fx);
            match &got {
                Some(d) => q.stats.note_delivery(true, ack, d.redelivered),
                None => q.stats.note_get_empty(),
            }
            got
        })
    }

    fn settle(
        &self,
        q: &QueueHandle,
        how: Settle,
        seqs: &mut dyn Iterator<Item = u64>,
        dispatch: bool,
        fx: &mut Effects,
    ) {
        self.locked(q, |st| {
            for seq in seqs {
                match how {
                    Settle::Ack => st.queue.ack(seq, fx),
                    Settle::Requeue => st.queue.requeue(seq, fx),
                    Settle::Reject => st.queue.reject(seq, fx),
                };
            }
            if dispatch {
                st.dispatch(q, fx);
            }
        });
    }

    fn dispatch(&self, q: &QueueHandle, fx: &mut Effects) {
        self.locked(q, |st| st.dispatch(q, fx));
    }

    fn purge(&self, fx: &mut Effects) -> u64 {
        self.state.lock().queue.purge(fx)
    }

    fn delete(&self, only_if_unused: bool, fx: &mut Effects) -> Option<(u64, Vec<Consumer>)> {
        let mut st = self.state.lock();
        if st.deleted || (only_if_unused && !st.consumers.is_empty()) {
            return None;
        }
        st.deleted = true;
        Some((st.queue.delete(fx), std::mem::take(&mut st.consumers)))
    }

    fn delete_if_drained(&self, fx: &mut Effects) -> bool {
        let mut st = self.state.lock();
        if st.deleted {
            return true;
        }
        if st.queue.ready_count() > 0 || st.queue.unacked_count() > 0 {
            return false;
        }
        st.deleted = true;
        st.queue.delete(fx);
        st.consumers.clear();
        true
    }

    fn set_effective_args(&self, q: &QueueHandle, args: QueueArgs, fx: &mut Effects) -> bool {
        self.locked(q, |st| {
            if st.deleted {
                return false;
            }
            st.queue.set_effective_args(args, fx);
            st.dispatch(q, fx);
            true
        })
    }

    fn deadlines(&self) -> Option<(Option<u64>, Option<u64>)> {
        let st = self.state.lock();
        if st.deleted {
            return None;
        }
        let unused = if st.consumers.is_empty() {
            st.queue.unused_deadline()
        } else {
            None
        };
        Some((st.queue.next_expiry(), unused))
    }

    fn unused_since_deadline(&self, now: u64) -> bool {
        let st = self.state.lock();
        st.consumers.is_empty() && st.queue.unused_deadline().is_some_and(|d| d <= now)
    }

    fn expire(&self, q: &QueueHandle, now: u64, fx: &mut Effects) {
        let mut st = self.state.lock();
        st.queue.expire(now, fx);
        st.dispatch(q, fx);
    }

    fn wanted_page_in(&self) -> Vec<MessageId> {
        let mut st = self.state.lock();
        if !std::mem::take(&mut st.page_in_wanted) || st.deleted {
            return Vec::new();
        }
        let QueueState {
            queue, unloadable, ..
        } = &mut *st;
        queue
            .paged_heads(PAGE_IN_SCAN, PAGE_IN_BATCH, PAGE_IN_BYTES)
            .into_iter()
            .filter(|id| !unloadable.contains(id))
            .collect()
    }

    fn page_in(
        &self,
        q: &QueueHandle,
        loaded: Vec<Arc<Message>>,
        failed: Vec<MessageId>,
        fx: &mut Effects,
    ) {
        let mut st = self.state.lock();
        st.queue.page_in(loaded, PAGE_IN_SCAN);
        st.unloadable.extend(failed);
        st.until_prefetch = PAGE_IN_BATCH / 2;
        st.dispatch(q, fx);
    }

    fn wanted_spill_io(&self) -> Option<SpillIo> {
        let mut st = self.state.lock();
        let asked = std::mem::take(&mut st.spill_io_asked);
        if !(st.queue.take_spill_io_wanted() || asked) || st.deleted {
            return None;
        }
        Some(st.queue.spill_io()).filter(|io| !io.is_empty())
    }

    fn spill_io_done(&self, q: &QueueHandle, done: SpillIoDone, fx: &mut Effects) {
        self.locked(q, |st| {
            st.queue.spill_io_done(done);
            st.dispatch(q, fx);
        });
    }

    fn memory_in_use(&self, q: &QueueHandle) -> u64 {
        let st = self.state.lock();
        // Queues shrink in ways that do not dispatch (expiry, purge): their
        // flow gates are checked here too.
        q.relieve_flow(st.ready_memory());
        st.memory_in_use()
    }
}

impl QueueState {
    fn counters(&self) -> QueueCounters {
        QueueCounters {
            ready: self.queue.ready_count(),
            unacked: self.queue.unacked_count(),
            ready_bytes: self.queue.ready_bytes(),
            unacked_bytes: self.queue.unacked_bytes(),
            consumers: self.consumers.len(),
            memory: self.memory_in_use(),
            spilled: self.queue.spilled_count(),
        }
    }

    /// Asks the housekeeping task to load paged bodies at the head.
    fn want_page_in(&mut self, handle: &QueueHandle) {
        if !self.page_in_wanted {
            self.page_in_wanted = true;
            handle.wake.notify_one();
        }
    }

    /// Enqueues a published message and delivers what it can; returns the
    /// outcome and whether anything was written to the store (then a confirm
    /// must wait for the commit point). The writes are submitted before
    /// delivering, so that a body paged out on enqueue can already be loaded.
    fn publish(
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
        self.dispatch(handle, fx);
        // A message with a TTL of 0 that no consumer took expires now.
        if self.queue.take_zero_ttl_published() {
            self.queue.expire_undelivered(now_ms(), fx);
        }
        (outcome, wrote)
    }

    /// Memory of the ready messages only: what publishers are paused for.
    /// (Unacknowledged ones wait for consumers; counting them could pause a
    /// connection whose own acks would relieve the queue.)
    fn ready_memory(&self) -> u64 {
        let spilled = self.queue.spilled_count();
        self.queue.loaded_bytes()
            + (self.queue.ready_count() - spilled) * ENTRY_OVERHEAD
            + spilled * SPILLED_ENTRY_OVERHEAD
    }

    /// Memory this queue accounts for: bodies it holds in memory (ready and
    /// delivered-but-unacknowledged) plus [`ENTRY_OVERHEAD`] per message in
    /// memory and [`SPILLED_ENTRY_OVERHEAD`] per spilled one.
    fn memory_in_use(&self) -> u64 {
        self.ready_memory()
            + self.queue.unacked_bytes()
            + self.queue.unacked_count() * ENTRY_OVERHEAD
    }

    /// Hands ready messages to consumers with credit (see
    /// [`QueueState::dispatch_ready`]), then lowers the queue's flow gate if
    /// that drained it enough.
    fn dispatch(&mut self, handle: &QueueHandle, fx: &mut Effects) {
        self.dispatch_ready(handle, fx);
        if handle.flow.is_raised() {
            handle.relieve_flow(self.ready_memory());
        }
        let deliverable = self.can_deliver_now();
        self.deliverable.set(deliverable, now_ms);
    }

    /// Whether a consumer that may be served could take a message now (after
    /// a dispatch: none can while messages are ready).
    fn can_deliver_now(&self) -> bool {
        if self.deleted {
            return false;
        }
        let n = if self.queue.args().single_active_consumer {
            1
        } else {
            self.consumers.len()
        };
        self.consumers
            .iter()
            .take(n)
            .any(|c| c.has_credit() && c.sink.can_deliver())
    }

    /// Hands ready messages to consumers with credit, round-robin, until the
    /// queue is empty or no consumer can take more.
    fn dispatch_ready(&mut self, handle: &QueueHandle, fx: &mut Effects) {
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
            let ready = |c: &Consumer| c.has_credit() && c.sink.can_deliver();
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
            if let Some(id) = self.queue.paged_head() {
                if self.unloadable.contains(&id) {
                    // Delivered (settled) in place: its load failed.
                    self.unloadable.retain(|u| *u != id);
                } else {
                    // Not read here, under the lock, on a runtime worker.
                    self.want_page_in(handle);
                    return;
                }
            }
            let Some(delivery) = self.queue.deliver(now, ack, fx) else {
                return;
            };
            handle.stats.note_delivery(false, ack, delivery.redelivered);
            if self.until_prefetch > 0 {
                self.until_prefetch -= 1;
            } else if self.queue.has_paged() {
                // Ask for the next batch while this one is delivered.
                self.until_prefetch = PAGE_IN_BATCH / 2;
                self.want_page_in(handle);
            }
            let consumer = &self.consumers[idx];
            deliver(handle, consumer, delivery, fx, &mut self.queue);
        }
    }
}

/// Sends one delivery to a consumer: tag it on the channel, encode it into the
/// connection's outbox.
fn deliver(
    handle: &QueueHandle,
    consumer: &Consumer,
    delivery: Delivery,
    fx: &mut Effects,
    queue: &mut Queue,
) {
    let MessageRef::Loaded(message) = &delivery.message else {
        // Only a head whose page-in failed gets here paged (it is not read
        // again under the lock): the body is gone (storage failure), so it
        // is settled rather than looped on.
        if !consumer.no_ack {
            queue.ack(delivery.seq, fx);
        }
        return;
    };
    consumer.sink.deliver(Outgoing {
        queue: handle,
        consumer_tag: &consumer.tag,
        seq: delivery.seq,
        redelivered: delivery.redelivered,
        delivery_count: delivery.delivery_count,
        message,
        consumer_unacked: (!consumer.no_ack).then_some(&consumer.unacked),
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use amqp_codec::{ContentHeader, FieldTable};
    use bytes::Bytes;
    use queue_store::{Message, Queue, QueueArgs, Store};

    use super::*;

    /// `delete_if_drained` deletes a queue only once it holds nothing, and
    /// a publish after is refused (the mover sends that one on to the
    /// replicated successor): nothing published is dropped with it.
    #[test]
    fn a_queue_is_deleted_if_drained_only_when_it_holds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let args = QueueArgs::parse(&FieldTable::default(), "q", "/").unwrap();
        let queue = Queue::in_memory(
            1,
            ShortStr::from_static("q"),
            args,
            FieldTable::default(),
            now_ms(),
        );
        let q = QueueHandle::new(queue, false, None, 0, Arc::default());
        let message = Message::new(
            store.next_message_id(),
            ShortStr::from_static(""),
            ShortStr::from_static("q"),
            ContentHeader::default(),
            Bytes::from_static(b"m"),
        );
        let mut fx = Effects::default();
        assert!(q.publish(&message, &store, &mut fx).is_some());
        assert!(!q.kind().delete_if_drained(&mut fx), "one ready");
        let delivered = q.get(true, &mut fx).unwrap();
        assert!(!q.kind().delete_if_drained(&mut fx), "one unacknowledged");
        q.settle(
            crate::queue::Settle::Ack,
            &mut std::iter::once(delivered.seq),
            false,
            &mut fx,
        );
        assert!(q.kind().delete_if_drained(&mut fx));
        assert!(q.publish(&message, &store, &mut fx).is_none());
        assert!(q.kind().delete_if_drained(&mut fx), "still deleted");
    }
}
