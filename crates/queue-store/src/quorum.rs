//! A quorum queue's state machine: what every replica of a replicated queue
//! applies, in log order, from the entries its Raft group committed.
//!
//! It must be deterministic: the same commands give the same state and the
//! same effects on every replica, whatever happened before on that node and
//! whether the replica started from a snapshot. So time is part of each
//! command (the leader's clock when it proposed it), collections are
//! ordered, and the messages live in a [`Queue`] held in memory only
//! ([`Queue::in_memory`]: no storage writes, no spill files, nothing paged;
//! the log is the durability), which gives RabbitMQ's message semantics
//! (FIFO with requeue to the original position, TTL, max-length with
//! `x-overflow`, dead-lettering, `x-delivery-limit`, priorities).
//!
//! Consumers are part of the state, as in RabbitMQ's `rabbit_fifo`: a
//! consumer is checked out by a command, and applying a command assigns
//! ready messages to consumers with credit (highest `x-priority` first,
//! round-robin among equals; with `x-single-active-consumer` only the
//! earliest registered consumer gets any). Every replica computes the same
//! assignments; the node that runs the consumer acts on its
//! [`QuorumEffect::Deliver`]s. A delivery is therefore never a log entry of
//! its own: enqueue, checkout and settle are.
//!
//! A consumer is known by a [`ConsumerKey`]: the node it runs on and a
//! number that node chose. When a node cannot be reached
//! ([`QuorumCommand::NodeDown`]) or a consumer's channel closes
//! ([`QuorumCommand::Down`]), what it had not settled goes back to the
//! queue, marked redelivered; a node's consumers are only suspected while
//! it is unreachable, and take messages again once it is back
//! ([`QuorumCommand::NodeUp`]).
//!
//! Dead letters leave in [`Effects::dead_letters`] for the leader to route
//! once (RabbitMQ's `at-most-once`), unless the queue was declared with
//! `x-dead-letter-strategy: at-least-once` and its overflow is
//! `reject-publish` (RabbitMQ's conditions): then they stay in the state,
//! each under a number, until [`QuorumCommand::SettleDeadLetters`] says
//! the dead-letter exchange's queues have them ([`QuorumEffect::DeadLetter`]
//! asks the leader to route one; a new leader routes every one still held).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use amqp_codec::{FieldTable, ShortStr};

use crate::args::{DeadLetterStrategy, QueueArgs};
use crate::message::Message;
use crate::queue::{DeadLetterRequest, Delivery, Effects, Enqueued, Queue, QueueImage};

/// A consumer (or a `basic.get` requester): the node it runs on, and its
/// number there.
pub type ConsumerKey = (u64, u64);

/// The number of a node's `basic.get` requester (consumers are numbered
/// from 1).
pub const REQUESTER: u64 = 0;

/// How a consumer takes messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    /// Most unsettled deliveries at once; 0 = no limit.
    pub prefetch: u32,
    /// Settled at delivery (`no-ack`).
    pub no_ack: bool,
    /// `x-priority`.
    pub priority: i32,
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// `basic.ack`.
    Ack,
    /// `basic.nack`/`basic.reject` with requeue, or `basic.recover`.
    Requeue,
    /// `basic.nack`/`basic.reject` without requeue: dead-lettered or dropped.
    Reject,
}

/// One entry of a quorum queue's log.
#[derive(Debug, Clone, PartialEq)]
pub enum QuorumCommand {
    /// A published message.
    Enqueue {
        /// The message.
        message: Arc<Message>,
        /// The proposer's clock, ms since the epoch.
        now_ms: u64,
    },
    /// A consumer starts (`basic.consume`).
    Checkout {
        /// The consumer.
        consumer: ConsumerKey,
        /// How it takes messages.
        spec: ConsumerSpec,
        /// The proposer's clock.
        now_ms: u64,
    },
    /// A consumer stops taking messages (`basic.cancel`); what it holds
    /// stays with it until settled or [`Down`](Self::Down). (With single
    /// active consumer, the next one takes over.)
    Cancel {
        /// The consumer.
        consumer: ConsumerKey,
        /// The proposer's clock.
        now_ms: u64,
    },
    /// Deliveries settled by the node of the consumer (or requester) they
    /// went to.
    Settle {
        /// Whose deliveries: only those held by consumers on its node
        /// (`consumer.0`) are settled, whichever consumer there holds them
        /// (a node's channels know their deliveries by sequence number).
        consumer: ConsumerKey,
        /// Their sequence numbers.
        seqs: Vec<u64>,
        /// How.
        how: Settlement,
        /// The proposer's clock.
        now_ms: u64,
    },
    /// `basic.get`: one message for `requester`, unsettled unless `no_ack`.
    Get {
        /// Who asks (a channel, keyed like a consumer).
        requester: ConsumerKey,
        /// Settled at once.
        no_ack: bool,
        /// The proposer's clock.
        now_ms: u64,
    },
    /// A consumer's (or requester's) channel is gone: it is removed and
    /// what it held returns to the queue.
    Down {
        /// The consumer.
        consumer: ConsumerKey,
        /// The proposer's clock.
        now_ms: u64,
    },
    /// A node cannot be reached: its requesters are removed, and its
    /// consumers are suspected (they take nothing, and what they held
    /// returns to the queue) until [`NodeUp`](Self::NodeUp) or
    /// [`Down`](Self::Down).
    NodeDown {
        /// The node.
        node: u64,
        /// The proposer's clock.
        now_ms: u64,
    },
    /// A node started again: its consumers and requester from earlier runs
    /// (numbered below `first_key`, the first number of this run) are gone,
    /// and what they held returns to the queue.
    NodeRestarted {
        /// The node.
        node: u64,
        /// The first consumer number of its current run.
        first_key: u64,
        /// The proposer's clock.
        now_ms: u64,
    },
    /// A node is reachable again: its suspected consumers take messages
    /// again (one whose channel is gone meanwhile is `Down`ed by its node
    /// when its next delivery finds no consumer).
    NodeUp {
        /// The node.
        node: u64,
        /// The proposer's clock.
        now_ms: u64,
    },
    /// `queue.purge`.
    Purge,
    /// Time passed: messages past their TTL expire.
    Tick {
        /// The proposer's clock.
        now_ms: u64,
    },
    /// The queue's effective arguments changed (a policy).
    SetArgs {
        /// The new arguments.
        args: QueueArgs,
        /// The proposer's clock.
        now_ms: u64,
    },
    /// Held dead letters the dead-letter exchange's queues now have
    /// (`at-least-once`): they go.
    SettleDeadLetters {
        /// Their numbers.
        ids: Vec<u64>,
    },
}

/// What applying a command asks of the node (acted on by the node the
/// effect concerns; the answer to the command by its proposer).
#[derive(Debug, Clone, PartialEq)]
pub enum QuorumEffect {
    /// A message assigned to a consumer.
    Deliver {
        /// The consumer.
        consumer: ConsumerKey,
        /// The message.
        delivery: Delivery,
    },
    /// A dead letter held until its queues have it (`at-least-once`): the
    /// leader routes it, then proposes [`QuorumCommand::SettleDeadLetters`].
    DeadLetter {
        /// Its number.
        id: u64,
        /// The message and why it left.
        request: DeadLetterRequest,
    },
}

/// The answer to one command, for whoever proposed it.
#[derive(Debug, Clone, PartialEq)]
pub enum QuorumReply {
    /// Nothing to say.
    Done,
    /// An enqueue's fate (`Rejected` by `x-overflow: reject-publish`).
    Enqueued(Enqueued),
    /// A `basic.get`'s message, if there was one.
    Got(Option<Delivery>),
    /// Messages purged.
    Purged(u64),
}

/// A consumer as the state machine knows it.
#[derive(Debug, Clone, PartialEq)]
struct Consumer {
    spec: ConsumerSpec,
    /// Still taking messages (not cancelled); a `basic.get` requester never is.
    active: bool,
    /// On a node that cannot be reached ([`QuorumCommand::NodeDown`]).
    suspected: bool,
    /// Unsettled deliveries it holds.
    in_flight: u32,
    /// Order of registration (single active consumer: the earliest wins).
    since: u64,
}

impl Consumer {
    fn has_credit(&self) -> bool {
        self.active && (self.spec.prefetch == 0 || self.in_flight < self.spec.prefetch)
    }
}

/// A quorum queue's replicated state.
#[derive(Debug)]
pub struct QuorumState {
    queue: Queue,
    consumers: BTreeMap<ConsumerKey, Consumer>,
    /// Active consumers in round-robin order (the next to try first).
    order: VecDeque<ConsumerKey>,
    /// Unsettled deliveries: sequence number -> holder.
    checked_out: BTreeMap<u64, ConsumerKey>,
    registrations: u64,
    /// The `x-dead-letter-strategy` it was declared with, if any: it wins
    /// over a policy's (as RabbitMQ's), and over arguments in entries
    /// written before policies could set one.
    declared_strategy: Option<DeadLetterStrategy>,
    /// Dead letters held until their queues have them (`at-least-once`).
    dead_letters: BTreeMap<u64, DeadLetterRequest>,
    /// The number the next held dead letter gets.
    next_dead_letter: u64,
}

/// Everything of a [`QuorumState`] a snapshot holds: the ready and
/// unsettled messages and the consumers, no history.
#[derive(Debug, Clone, PartialEq)]
pub struct QuorumSnapshot {
    /// The effective arguments (a policy may have changed them).
    pub args: QueueArgs,
    /// The messages.
    pub queue: QueueImage,
    /// Active consumers in round-robin order, then cancelled consumers and
    /// `basic.get` requesters that still hold deliveries.
    pub consumers: Vec<SnapshotConsumer>,
    /// Unsettled deliveries: (sequence number, holder).
    pub checked_out: Vec<(u64, ConsumerKey)>,
    /// Registrations so far.
    pub registrations: u64,
    /// Dead letters held (`at-least-once`), by number.
    pub dead_letters: Vec<(u64, DeadLetterRequest)>,
    /// The number the next held dead letter gets.
    pub next_dead_letter: u64,
}

/// A consumer in a [`QuorumSnapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotConsumer {
    /// Its key.
    pub key: ConsumerKey,
    /// How it takes messages.
    pub spec: ConsumerSpec,
    /// Not cancelled.
    pub active: bool,
    /// On a node that could not be reached.
    pub suspected: bool,
    /// Its registration order.
    pub since: u64,
}

impl QuorumState {
    /// An empty queue. `id` and `name` identify it (in dead letters' `x-death`).
    pub fn new(
        id: u64,
        name: ShortStr,
        args: QueueArgs,
        arguments: FieldTable,
        now_ms: u64,
    ) -> Self {
        let declared_strategy = DeadLetterStrategy::declared(&arguments);
        QuorumState {
            queue: Queue::in_memory(id, name, args, arguments, now_ms),
            consumers: BTreeMap::new(),
            order: VecDeque::new(),
            checked_out: BTreeMap::new(),
            registrations: 0,
            declared_strategy,
            dead_letters: BTreeMap::new(),
            next_dead_letter: 0,
        }
    }

    /// Whether dead letters are held until their queues have them:
    /// `at-least-once` (declared, or else by a policy), with `x-overflow:
    /// reject-publish` (else RabbitMQ too falls back to `at-most-once`) and
    /// a dead-letter exchange.
    pub fn holds_dead_letters(&self) -> bool {
        let args = self.queue.args();
        self.declared_strategy.unwrap_or(args.dead_letter_strategy)
            == DeadLetterStrategy::AtLeastOnce
            && args.overflow == crate::args::Overflow::RejectPublish
            && args.dead_letter_exchange.is_some()
    }

    /// The dead letters held (`at-least-once`), in order.
    pub fn held_dead_letters(&self) -> Vec<(u64, DeadLetterRequest)> {
        self.dead_letters
            .iter()
            .map(|(id, r)| (*id, r.clone()))
            .collect()
    }

    /// The messages (counts, arguments).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Consumers taking messages (not cancelled, not `basic.get` requesters).
    pub fn consumer_count(&self) -> usize {
        self.consumers.values().filter(|c| c.active).count()
    }

    /// Applies one committed command. Dead letters and drops go to `fx`
    /// (the node that acts on them decides: the leader), deliveries to
    /// `effects`.
    pub fn apply(
        &mut self,
        command: QuorumCommand,
        fx: &mut Effects,
        effects: &mut Vec<QuorumEffect>,
    ) -> QuorumReply {
        let (reply, now_ms) = match command {
            QuorumCommand::Enqueue { message, now_ms } => (
                QuorumReply::Enqueued(self.queue.publish(&message, now_ms, fx)),
                now_ms,
            ),
            QuorumCommand::Checkout {
                consumer,
                spec,
                now_ms,
            } => {
                self.queue.touch(now_ms);
                self.registrations += 1;
                let since = self.registrations;
                let c = self.consumers.entry(consumer).or_insert(Consumer {
                    spec: spec.clone(),
                    active: true,
                    suspected: false,
                    in_flight: 0,
                    since,
                });
                c.spec = spec;
                c.active = true;
                c.suspected = false;
                if !self.order.contains(&consumer) {
                    self.order.push_back(consumer);
                }
                (QuorumReply::Done, now_ms)
            }
            QuorumCommand::Cancel { consumer, now_ms } => {
                if let Some(c) = self.consumers.get_mut(&consumer) {
                    c.active = false;
                }
                self.order.retain(|k| *k != consumer);
                self.forget_if_idle(consumer);
                (QuorumReply::Done, now_ms)
            }
            QuorumCommand::Settle {
                consumer,
                seqs,
                how,
                now_ms,
            } => {
                let mut holders = Vec::new();
                for seq in seqs {
                    // A node settles its own consumers' deliveries (by
                    // sequence number, as its channels know them): one held
                    // elsewhere (returned, and delivered again to a consumer
                    // on another node) is not this settle's to touch.
                    let Some(holder) = self.checked_out.get(&seq).copied() else {
                        continue;
                    };
                    if holder.0 != consumer.0 {
                        continue;
                    }
                    self.checked_out.remove(&seq);
                    if let Some(c) = self.consumers.get_mut(&holder) {
                        c.in_flight = c.in_flight.saturating_sub(1);
                    }
                    if !holders.contains(&holder) {
                        holders.push(holder);
                    }
                    match how {
                        Settlement::Ack => self.queue.ack(seq, fx),
                        Settlement::Requeue => self.queue.requeue(seq, fx),
                        Settlement::Reject => self.queue.reject(seq, fx),
                    };
                }
                for holder in holders {
                    self.forget_if_idle(holder);
                }
                (QuorumReply::Done, now_ms)
            }
            QuorumCommand::Get {
                requester,
                no_ack,
                now_ms,
            } => {
                self.queue.touch(now_ms);
                let got = self.queue.deliver(now_ms, !no_ack, fx);
                if let Some(d) = got.as_ref().filter(|_| !no_ack) {
                    self.checked_out.insert(d.seq, requester);
                    let since = self.registrations;
                    let holder = self.consumers.entry(requester).or_insert(Consumer {
                        spec: ConsumerSpec {
                            prefetch: 0,
                            no_ack: false,
                            priority: 0,
                        },
                        active: false,
                        suspected: false,
                        in_flight: 0,
                        since,
                    });
                    holder.in_flight += 1;
                }
                (QuorumReply::Got(got), now_ms)
            }
            QuorumCommand::Down { consumer, now_ms } => {
                self.remove(consumer, fx);
                (QuorumReply::Done, now_ms)
            }
            QuorumCommand::NodeDown { node, now_ms } => {
                let gone: Vec<ConsumerKey> = self
                    .consumers
                    .keys()
                    .filter(|k| k.0 == node)
                    .copied()
                    .collect();
                for key in gone {
                    if key.1 == REQUESTER {
                        self.remove(key, fx);
                    } else {
                        self.suspect(key, fx);
                    }
                }
                (QuorumReply::Done, now_ms)
            }
            QuorumCommand::NodeRestarted {
                node,
                first_key,
                now_ms,
            } => {
                let gone: Vec<ConsumerKey> = self
                    .consumers
                    .keys()
                    .filter(|k| k.0 == node && k.1 < first_key)
                    .copied()
                    .collect();
                for key in gone {
                    self.remove(key, fx);
                }
                (QuorumReply::Done, now_ms)
            }
            QuorumCommand::NodeUp { node, now_ms } => {
                let back: Vec<ConsumerKey> = self
                    .consumers
                    .iter()
                    .filter(|(k, c)| k.0 == node && c.suspected)
                    .map(|(k, _)| *k)
                    .collect();
                for key in back {
                    if let Some(c) = self.consumers.get_mut(&key) {
                        c.suspected = false;
                        c.active = true;
                    }
                    self.order.push_back(key);
                }
                (QuorumReply::Done, now_ms)
            }
            QuorumCommand::Purge => {
                let purged = self.queue.purge(fx);
                self.hold_dead_letters(fx, effects);
                return QuorumReply::Purged(purged);
            }
            QuorumCommand::Tick { now_ms } => {
                self.queue.expire(now_ms, fx);
                (QuorumReply::Done, now_ms)
            }
            QuorumCommand::SetArgs { args, now_ms } => {
                self.queue.set_effective_args(args, fx);
                (QuorumReply::Done, now_ms)
            }
            QuorumCommand::SettleDeadLetters { ids } => {
                for id in ids {
                    self.dead_letters.remove(&id);
                }
                return QuorumReply::Done;
            }
        };
        self.dispatch(now_ms, fx, effects);
        self.hold_dead_letters(fx, effects);
        reply
    }

    /// With `at-least-once`, takes the dead letters out of `fx` and holds
    /// them, each with a [`QuorumEffect::DeadLetter`] for the leader.
    fn hold_dead_letters(&mut self, fx: &mut Effects, effects: &mut Vec<QuorumEffect>) {
        if fx.dead_letters.is_empty() || !self.holds_dead_letters() {
            return;
        }
        for request in fx.dead_letters.drain(..) {
            let id = self.next_dead_letter;
            self.next_dead_letter += 1;
            self.dead_letters.insert(id, request.clone());
            effects.push(QuorumEffect::DeadLetter { id, request });
        }
    }

    /// Returns to the queue what `consumer` holds (in sequence order).
    fn return_held(&mut self, consumer: ConsumerKey, fx: &mut Effects) {
        let held: Vec<u64> = self
            .checked_out
            .iter()
            .filter(|(_, k)| **k == consumer)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in held {
            self.checked_out.remove(&seq);
            self.queue.requeue(seq, fx);
        }
    }

    /// Removes a consumer, returning what it held (in sequence order).
    fn remove(&mut self, consumer: ConsumerKey, fx: &mut Effects) {
        self.return_held(consumer, fx);
        self.consumers.remove(&consumer);
        self.order.retain(|k| *k != consumer);
    }

    /// Suspects a consumer: it takes nothing, and what it held returns to
    /// the queue (its node will not settle it: another consumer may get it).
    fn suspect(&mut self, consumer: ConsumerKey, fx: &mut Effects) {
        self.return_held(consumer, fx);
        let Some(c) = self.consumers.get_mut(&consumer) else {
            return;
        };
        if !c.active {
            // Cancelled, and what it held is back in the queue: gone.
            self.consumers.remove(&consumer);
            return;
        }
        c.active = false;
        c.suspected = true;
        c.in_flight = 0;
        self.order.retain(|k| *k != consumer);
    }

    /// The nodes whose consumers are suspected.
    pub fn suspected_nodes(&self) -> Vec<u64> {
        let mut nodes: Vec<u64> = self
            .consumers
            .iter()
            .filter(|(_, c)| c.suspected)
            .map(|(k, _)| k.0)
            .collect();
        nodes.dedup();
        nodes
    }

    /// Forgets a cancelled consumer (or requester) that holds nothing.
    fn forget_if_idle(&mut self, consumer: ConsumerKey) {
        if self
            .consumers
            .get(&consumer)
            .is_some_and(|c| !c.active && !c.suspected && c.in_flight == 0)
        {
            self.consumers.remove(&consumer);
            self.order.retain(|k| *k != consumer);
        }
    }

    /// The consumer the next message goes to: with credit, of the highest
    /// priority, the first in round-robin order; with single active
    /// consumer, only the earliest registered active one.
    fn next_consumer(&self) -> Option<ConsumerKey> {
        if self.queue.args().single_active_consumer {
            let (key, c) = self
                .consumers
                .iter()
                .filter(|(_, c)| c.active)
                .min_by_key(|(_, c)| c.since)?;
            return c.has_credit().then_some(*key);
        }
        let mut best: Option<(i32, ConsumerKey)> = None;
        for key in &self.order {
            let Some(c) = self.consumers.get(key) else {
                continue;
            };
            if c.has_credit() && best.is_none_or(|(p, _)| c.spec.priority > p) {
                best = Some((c.spec.priority, *key));
            }
        }
        best.map(|(_, k)| k)
    }

    /// Assigns ready messages to consumers with credit.
    fn dispatch(&mut self, now_ms: u64, fx: &mut Effects, effects: &mut Vec<QuorumEffect>) {
        while self.queue.ready_count() > 0 {
            let Some(key) = self.next_consumer() else {
                break;
            };
            let Some(c) = self.consumers.get_mut(&key) else {
                break;
            };
            let no_ack = c.spec.no_ack;
            let Some(delivery) = self.queue.deliver(now_ms, !no_ack, fx) else {
                break;
            };
            if !no_ack {
                c.in_flight += 1;
                self.checked_out.insert(delivery.seq, key);
            }
            if let Some(pos) = self.order.iter().position(|k| *k == key) {
                self.order.remove(pos);
                self.order.push_back(key);
            }
            effects.push(QuorumEffect::Deliver {
                consumer: key,
                delivery,
            });
        }
    }

    /// Every unsettled delivery and its holder, in sequence order, marked
    /// redelivered: what a new leader hands out again, since its
    /// predecessor may have died before it sent them (the consuming node
    /// drops one it has already).
    pub fn checked_out(&self) -> Vec<(ConsumerKey, Delivery)> {
        let Some(image) = self.queue.image() else {
            return Vec::new();
        };
        let remaining = self.queue.ready_count();
        image
            .unacked
            .into_iter()
            .filter_map(|e| {
                let holder = *self.checked_out.get(&e.seq)?;
                Some((
                    holder,
                    Delivery {
                        seq: e.seq,
                        message: crate::queue::MessageRef::Loaded(e.message),
                        redelivered: true,
                        delivery_count: e.delivery_count,
                        remaining,
                    },
                ))
            })
            .collect()
    }

    /// The nodes whose consumers (or `basic.get` requesters) the state
    /// holds.
    pub fn consumer_nodes(&self) -> Vec<u64> {
        let mut nodes: Vec<u64> = self.consumers.keys().map(|k| k.0).collect();
        nodes.dedup();
        nodes
    }

    /// What a snapshot holds.
    pub fn snapshot(&self) -> QuorumSnapshot {
        let queue = self.queue.image().unwrap_or_else(|| {
            // Unreachable: an in-memory queue pages and spills nothing.
            QueueImage {
                next_seq: 0,
                last_used_ms: 0,
                ready: Vec::new(),
                unacked: Vec::new(),
            }
        });
        let mut consumers: Vec<SnapshotConsumer> = self
            .order
            .iter()
            .filter_map(|k| self.consumers.get(k).map(|c| (k, c)))
            .map(|(k, c)| SnapshotConsumer {
                key: *k,
                spec: c.spec.clone(),
                active: c.active,
                suspected: c.suspected,
                since: c.since,
            })
            .collect();
        // Cancelled consumers and requesters are not in the round-robin order.
        consumers.extend(
            self.consumers
                .iter()
                .filter(|(k, _)| !self.order.contains(k))
                .map(|(k, c)| SnapshotConsumer {
                    key: *k,
                    spec: c.spec.clone(),
                    active: c.active,
                    suspected: c.suspected,
                    since: c.since,
                }),
        );
        QuorumSnapshot {
            args: self.queue.args().clone(),
            queue,
            consumers,
            checked_out: self.checked_out.iter().map(|(s, k)| (*s, *k)).collect(),
            registrations: self.registrations,
            dead_letters: self.held_dead_letters(),
            next_dead_letter: self.next_dead_letter,
        }
    }

    /// The state a snapshot describes. `id`, `name` and `arguments` are the
    /// queue's, as declared.
    pub fn restore(
        id: u64,
        name: ShortStr,
        arguments: FieldTable,
        snapshot: QuorumSnapshot,
    ) -> Self {
        let queue = Queue::from_image(id, name, snapshot.args, arguments, snapshot.queue);
        let checked_out: BTreeMap<u64, ConsumerKey> = snapshot.checked_out.into_iter().collect();
        let mut consumers = BTreeMap::new();
        let mut order = VecDeque::new();
        for c in snapshot.consumers {
            let in_flight = checked_out.values().filter(|k| **k == c.key).count();
            if c.active {
                order.push_back(c.key);
            }
            consumers.insert(
                c.key,
                Consumer {
                    spec: c.spec,
                    active: c.active,
                    suspected: c.suspected,
                    in_flight: u32::try_from(in_flight).unwrap_or(u32::MAX),
                    since: c.since,
                },
            );
        }
        QuorumState {
            declared_strategy: DeadLetterStrategy::declared(queue.arguments()),
            queue,
            consumers,
            order,
            checked_out,
            registrations: snapshot.registrations,
            dead_letters: snapshot.dead_letters.into_iter().collect(),
            next_dead_letter: snapshot.next_dead_letter,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageId;
    use amqp_codec::{BasicProperties, ContentHeader, class_id};
    use bytes::Bytes;
    use proptest::prelude::*;

    fn msg(id: u64) -> Arc<Message> {
        prioritised(id, None)
    }

    fn prioritised(id: u64, priority: Option<u8>) -> Arc<Message> {
        let properties = BasicProperties {
            priority,
            ..BasicProperties::default()
        };
        Message::new(
            MessageId(id),
            ShortStr::from_static(""),
            ShortStr::from_static("q"),
            ContentHeader {
                class_id: class_id::BASIC,
                weight: 0,
                body_size: 8,
                properties: properties.to_raw().unwrap(),
            },
            Bytes::copy_from_slice(&id.to_be_bytes()),
        )
    }

    fn state(args: QueueArgs) -> QuorumState {
        QuorumState::new(
            1,
            ShortStr::from_static("q"),
            args,
            FieldTable::default(),
            0,
        )
    }

    fn run(s: &mut QuorumState, c: QuorumCommand) -> (QuorumReply, Vec<QuorumEffect>, Effects) {
        let mut fx = Effects::default();
        let mut effects = Vec::new();
        let reply = s.apply(c, &mut fx, &mut effects);
        (reply, effects, fx)
    }

    fn enqueue(id: u64) -> QuorumCommand {
        QuorumCommand::Enqueue {
            message: msg(id),
            now_ms: 1,
        }
    }

    fn checkout(node: u64, n: u64, prefetch: u32) -> QuorumCommand {
        QuorumCommand::Checkout {
            consumer: (node, n),
            spec: ConsumerSpec {
                prefetch,
                no_ack: false,
                priority: 0,
            },
            now_ms: 1,
        }
    }

    fn delivered(effects: &[QuorumEffect]) -> Vec<(ConsumerKey, u64, bool)> {
        effects
            .iter()
            .filter_map(|e| match e {
                QuorumEffect::Deliver { consumer, delivery } => {
                    Some((*consumer, delivery.seq, delivery.redelivered))
                }
                QuorumEffect::DeadLetter { .. } => None,
            })
            .collect()
    }

    /// A queue declared with `x-dead-letter-strategy: at-least-once` and a
    /// dead-letter exchange, overflowing as `overflow`.
    fn at_least_once(overflow: crate::args::Overflow) -> QuorumState {
        let mut arguments = FieldTable::default();
        arguments.insert(
            ShortStr::from_static("x-dead-letter-strategy"),
            amqp_codec::FieldValue::LongStr(Bytes::from_static(b"at-least-once")),
        );
        QuorumState::new(
            1,
            ShortStr::from_static("q"),
            QueueArgs {
                overflow,
                dead_letter_exchange: Some(ShortStr::from_static("dlx")),
                ..QueueArgs::default()
            },
            arguments,
            0,
        )
    }

    fn reject(node: u64, n: u64, seq: u64) -> QuorumCommand {
        QuorumCommand::Settle {
            consumer: (node, n),
            seqs: vec![seq],
            how: Settlement::Reject,
            now_ms: 2,
        }
    }

    fn held_ids(effects: &[QuorumEffect]) -> Vec<u64> {
        effects
            .iter()
            .filter_map(|e| match e {
                QuorumEffect::DeadLetter { id, .. } => Some(*id),
                QuorumEffect::Deliver { .. } => None,
            })
            .collect()
    }

    #[test]
    fn at_least_once_holds_a_dead_letter_until_settled_and_a_snapshot_keeps_it() {
        let mut s = at_least_once(crate::args::Overflow::RejectPublish);
        assert!(s.holds_dead_letters());
        run(&mut s, checkout(1, 1, 10));
        run(&mut s, enqueue(1));
        run(&mut s, enqueue(2));
        let (_, effects, fx) = run(&mut s, reject(1, 1, 1));
        // Not handed out to route once: held, under number 0.
        assert!(fx.dead_letters.is_empty());
        assert_eq!(held_ids(&effects), vec![0]);
        let (_, effects, _) = run(&mut s, reject(1, 1, 2));
        assert_eq!(held_ids(&effects), vec![1]);
        assert_eq!(
            s.held_dead_letters()
                .iter()
                .map(|(id, r)| (*id, r.reason, r.exchange.to_string()))
                .collect::<Vec<_>>(),
            vec![
                (0, crate::DeadLetterReason::Rejected, "dlx".to_owned()),
                (1, crate::DeadLetterReason::Rejected, "dlx".to_owned())
            ]
        );
        // A replica restored from a snapshot holds the same, and numbers on.
        let mut restored = QuorumState::restore(
            1,
            ShortStr::from_static("q"),
            s.queue().arguments().clone(),
            s.snapshot(),
        );
        assert_eq!(restored.snapshot(), s.snapshot());
        run(&mut s, QuorumCommand::SettleDeadLetters { ids: vec![0] });
        run(
            &mut restored,
            QuorumCommand::SettleDeadLetters { ids: vec![0] },
        );
        assert_eq!(s.held_dead_letters().len(), 1);
        assert_eq!(restored.snapshot(), s.snapshot());
        run(&mut s, enqueue(3));
        let (_, effects, _) = run(&mut s, reject(1, 1, 3));
        assert_eq!(held_ids(&effects), vec![2]);
    }

    #[test]
    fn at_least_once_without_reject_publish_routes_dead_letters_once_as_rabbitmq() {
        let mut s = at_least_once(crate::args::Overflow::DropHead);
        assert!(!s.holds_dead_letters());
        run(&mut s, checkout(1, 1, 10));
        run(&mut s, enqueue(1));
        let (_, effects, fx) = run(&mut s, reject(1, 1, 1));
        assert_eq!(fx.dead_letters.len(), 1);
        assert!(held_ids(&effects).is_empty());
        assert!(s.held_dead_letters().is_empty());
    }

    #[test]
    fn a_policys_strategy_applies_unless_the_queue_declared_its_own() {
        let held_by_policy = QueueArgs {
            overflow: crate::args::Overflow::RejectPublish,
            dead_letter_exchange: Some(ShortStr::from_static("dlx")),
            dead_letter_strategy: DeadLetterStrategy::AtLeastOnce,
            ..QueueArgs::default()
        };
        let set = |args: &QueueArgs| QuorumCommand::SetArgs {
            args: args.clone(),
            now_ms: 1,
        };
        // Declared without one: a policy's at-least-once holds dead letters
        // from its entry on, and a snapshot keeps it.
        let mut s = state(QueueArgs {
            dead_letter_strategy: DeadLetterStrategy::AtMostOnce,
            ..held_by_policy.clone()
        });
        assert!(!s.holds_dead_letters());
        run(&mut s, set(&held_by_policy));
        assert!(s.holds_dead_letters());
        run(&mut s, checkout(1, 1, 10));
        run(&mut s, enqueue(1));
        let (_, effects, fx) = run(&mut s, reject(1, 1, 1));
        assert!(fx.dead_letters.is_empty());
        assert_eq!(held_ids(&effects), vec![0]);
        let restored = QuorumState::restore(
            1,
            ShortStr::from_static("q"),
            s.queue().arguments().clone(),
            s.snapshot(),
        );
        assert!(restored.holds_dead_letters());
        // Declared at-least-once: arguments without it (a policy's, or an
        // entry written before policies carried one) do not turn it off.
        let mut declared = at_least_once(crate::args::Overflow::RejectPublish);
        run(
            &mut declared,
            set(&QueueArgs {
                dead_letter_strategy: DeadLetterStrategy::AtMostOnce,
                ..held_by_policy
            }),
        );
        assert!(declared.holds_dead_letters());
    }

    #[test]
    fn consumers_take_turns_within_their_prefetch() {
        let mut s = state(QueueArgs::default());
        run(&mut s, checkout(1, 1, 2));
        run(&mut s, checkout(2, 1, 2));
        let mut got = Vec::new();
        for id in 1..=5 {
            got.extend(delivered(&run(&mut s, enqueue(id)).1));
        }
        assert_eq!(
            got,
            vec![
                ((1, 1), 1, false),
                ((2, 1), 2, false),
                ((1, 1), 3, false),
                ((2, 1), 4, false)
            ]
        );
        assert_eq!(s.queue().ready_count(), 1);
        // An ack frees credit: the fifth goes to that consumer.
        let (_, fx, _) = run(
            &mut s,
            QuorumCommand::Settle {
                consumer: (2, 1),
                seqs: vec![2],
                how: Settlement::Ack,
                now_ms: 2,
            },
        );
        assert_eq!(delivered(&fx), vec![((2, 1), 5, false)]);
    }

    #[test]
    fn a_node_settles_only_what_its_own_consumers_hold_and_a_new_leader_can_list_it() {
        let mut s = state(QueueArgs::default());
        run(&mut s, checkout(1, 1, 1));
        run(&mut s, checkout(2, 7, 1));
        run(&mut s, enqueue(1));
        run(&mut s, enqueue(2));
        let held: Vec<(ConsumerKey, u64, bool)> = s
            .checked_out()
            .iter()
            .map(|(k, d)| (*k, d.seq, d.redelivered))
            .collect();
        assert_eq!(held, vec![((1, 1), 1, true), ((2, 7), 2, true)]);
        let settle = |node: u64, seq: u64| QuorumCommand::Settle {
            consumer: (node, 0),
            seqs: vec![seq],
            how: Settlement::Ack,
            now_ms: 2,
        };
        // Node 2 cannot settle node 1's delivery...
        run(&mut s, settle(2, 1));
        assert_eq!(s.queue().unacked_count(), 2);
        // ...node 1 can, by sequence number alone.
        run(&mut s, settle(1, 1));
        assert_eq!(s.queue().unacked_count(), 1);
        assert_eq!(s.checked_out().len(), 1);
        assert_eq!(s.consumer_nodes(), vec![1, 2]);
    }

    #[test]
    fn a_node_going_down_returns_its_deliveries_redelivered_to_the_others() {
        let mut s = state(QueueArgs::default());
        run(&mut s, checkout(1, 1, 1));
        run(&mut s, enqueue(1));
        run(&mut s, checkout(2, 7, 1));
        assert_eq!(s.queue().unacked_count(), 1);
        let (_, fx, _) = run(&mut s, QuorumCommand::NodeDown { node: 1, now_ms: 3 });
        assert_eq!(delivered(&fx), vec![((2, 7), 1, true)]);
        assert_eq!(s.consumer_count(), 1);
    }

    #[test]
    fn an_unreachable_nodes_consumers_take_nothing_until_it_is_back() {
        let mut s = state(QueueArgs::default());
        run(&mut s, checkout(1, 1, 1));
        run(&mut s, enqueue(1));
        // Node 1 is cut off: its delivery returns; nothing goes to it.
        run(&mut s, QuorumCommand::NodeDown { node: 1, now_ms: 3 });
        assert_eq!(s.queue().ready_count(), 1);
        assert_eq!(s.suspected_nodes(), vec![1]);
        assert!(delivered(&run(&mut s, enqueue(2)).1).is_empty());
        // A settle of what it held before is too late: it is not its own.
        run(
            &mut s,
            QuorumCommand::Settle {
                consumer: (1, 1),
                seqs: vec![1],
                how: Settlement::Ack,
                now_ms: 4,
            },
        );
        assert_eq!(s.queue().ready_count(), 2);
        // Back: it takes the first again, redelivered.
        let (_, fx, _) = run(&mut s, QuorumCommand::NodeUp { node: 1, now_ms: 5 });
        assert_eq!(delivered(&fx), vec![((1, 1), 1, true)]);
        assert!(s.suspected_nodes().is_empty());
    }

    #[test]
    fn a_restarted_nodes_earlier_consumers_are_gone_and_what_they_held_returns() {
        let mut s = state(QueueArgs::default());
        run(&mut s, checkout(1, 5, 1));
        run(&mut s, enqueue(1));
        run(&mut s, checkout(1, 9, 1));
        assert_eq!(s.queue().unacked_count(), 1);
        // Node 1 restarted; its first key now is 9.
        let (_, fx, _) = run(
            &mut s,
            QuorumCommand::NodeRestarted {
                node: 1,
                first_key: 9,
                now_ms: 3,
            },
        );
        assert_eq!(delivered(&fx), vec![((1, 9), 1, true)]);
        assert_eq!(s.consumer_count(), 1);
    }

    #[test]
    fn a_cancelled_consumer_keeps_and_settles_what_it_holds() {
        let mut s = state(QueueArgs::default());
        run(&mut s, checkout(1, 1, 0));
        run(&mut s, enqueue(1));
        run(
            &mut s,
            QuorumCommand::Cancel {
                consumer: (1, 1),
                now_ms: 2,
            },
        );
        assert!(delivered(&run(&mut s, enqueue(2)).1).is_empty());
        assert_eq!(s.queue().unacked_count(), 1);
        run(
            &mut s,
            QuorumCommand::Settle {
                consumer: (1, 1),
                seqs: vec![1],
                how: Settlement::Ack,
                now_ms: 2,
            },
        );
        assert_eq!((s.queue().unacked_count(), s.queue().ready_count()), (0, 1));
        assert_eq!(s.snapshot().consumers, vec![]);
    }

    #[test]
    fn the_delivery_limit_dead_letters_a_message_returned_too_often() {
        let args = QueueArgs {
            delivery_limit: Some(1),
            ..QueueArgs::default()
        };
        let mut s = state(args);
        run(&mut s, enqueue(1));
        for round in 0..2 {
            let (reply, _, _) = run(
                &mut s,
                QuorumCommand::Get {
                    requester: (1, 9),
                    no_ack: false,
                    now_ms: 1,
                },
            );
            let QuorumReply::Got(Some(d)) = reply else {
                panic!("round {round}: nothing to get: {reply:?}");
            };
            assert_eq!(d.delivery_count, round);
            let (_, _, fx) = run(
                &mut s,
                QuorumCommand::Settle {
                    consumer: (1, 9),
                    seqs: vec![d.seq],
                    how: Settlement::Requeue,
                    now_ms: 2,
                },
            );
            assert_eq!(fx.discarded.len(), round as usize, "round {round}");
        }
        assert_eq!(s.queue().ready_count() + s.queue().unacked_count(), 0);
    }

    #[test]
    fn single_active_consumer_feeds_the_earliest_until_it_goes() {
        let args = QueueArgs {
            single_active_consumer: true,
            ..QueueArgs::default()
        };
        let mut s = state(args);
        run(&mut s, checkout(1, 1, 0));
        run(&mut s, checkout(2, 1, 0));
        let got: Vec<_> = (1..=3)
            .flat_map(|id| delivered(&run(&mut s, enqueue(id)).1))
            .collect();
        assert!(got.iter().all(|(k, _, _)| *k == (1, 1)), "{got:?}");
        let (_, fx, _) = run(
            &mut s,
            QuorumCommand::Down {
                consumer: (1, 1),
                now_ms: 2,
            },
        );
        assert_eq!(
            delivered(&fx),
            vec![((2, 1), 1, true), ((2, 1), 2, true), ((2, 1), 3, true)]
        );
    }

    /// A command of a random schedule, over a few nodes and consumers.
    fn command() -> impl Strategy<Value = QuorumCommand> {
        let key = (1u64..4, 1u64..3);
        prop_oneof![
            4 => (1u64..1_000, proptest::option::of(0u8..4)).prop_map(|(id, priority)| {
                QuorumCommand::Enqueue { message: prioritised(id, priority), now_ms: id }
            }),
            1 => (key.clone(), 0u32..3, any::<bool>(), 0i32..2).prop_map(|(consumer, prefetch, no_ack, priority)| {
                QuorumCommand::Checkout { consumer, spec: ConsumerSpec { prefetch, no_ack, priority }, now_ms: 5 }
            }),
            1 => key.clone().prop_map(|consumer| QuorumCommand::Cancel { consumer, now_ms: 5 }),
            3 => (key.clone(), proptest::collection::vec(1u64..40, 1..4), 0u8..3).prop_map(|(consumer, seqs, how)| {
                let how = [Settlement::Ack, Settlement::Requeue, Settlement::Reject][usize::from(how)];
                QuorumCommand::Settle { consumer, seqs, how, now_ms: 6 }
            }),
            1 => (key.clone(), any::<bool>()).prop_map(|(requester, no_ack)| QuorumCommand::Get { requester, no_ack, now_ms: 7 }),
            1 => key.prop_map(|consumer| QuorumCommand::Down { consumer, now_ms: 8 }),
            1 => (1u64..4).prop_map(|node| QuorumCommand::NodeDown { node, now_ms: 9 }),
            1 => (1u64..4).prop_map(|node| QuorumCommand::NodeUp { node, now_ms: 10 }),
            1 => (1u64..4, 0u64..3).prop_map(|(node, first_key)| QuorumCommand::NodeRestarted { node, first_key, now_ms: 11 }),
            1 => Just(QuorumCommand::Purge),
            1 => proptest::collection::vec(0u64..10, 1..3).prop_map(|ids| QuorumCommand::SettleDeadLetters { ids }),
        ]
    }

    fn args() -> impl Strategy<Value = QueueArgs> {
        (
            proptest::option::of(0u64..6),
            proptest::option::of(0u64..3),
            any::<bool>(),
            proptest::option::of(1u8..3),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(max_length, delivery_limit, sac, max_priority, reject_publish, dlx)| QueueArgs {
                    max_length,
                    delivery_limit,
                    single_active_consumer: sac,
                    max_priority,
                    overflow: if reject_publish {
                        crate::args::Overflow::RejectPublish
                    } else {
                        crate::args::Overflow::DropHead
                    },
                    dead_letter_exchange: dlx.then(|| ShortStr::from_static("dlx")),
                    ..QueueArgs::default()
                },
            )
    }

    proptest! {
        /// Two replicas, one of which starts over from a snapshot taken
        /// part-way, give the same replies and effects for every command
        /// and end in the same state; and the state is consistent after
        /// every step.
        #[test]
        fn replicas_agree_and_a_snapshot_changes_nothing(
            args in args(),
            at_least_once in any::<bool>(),
            commands in proptest::collection::vec(command(), 1..80),
            cut in 0usize..80,
        ) {
            let mut arguments = FieldTable::default();
            if at_least_once {
                arguments.insert(
                    ShortStr::from_static("x-dead-letter-strategy"),
                    amqp_codec::FieldValue::LongStr(Bytes::from_static(b"at-least-once")),
                );
            }
            let new = || QuorumState::new(1, ShortStr::from_static("q"), args.clone(), arguments.clone(), 0);
            let mut a = new();
            let mut b = new();
            for (i, c) in commands.into_iter().enumerate() {
                if i == cut {
                    let snap = b.snapshot();
                    b = QuorumState::restore(1, ShortStr::from_static("q"), arguments.clone(), snap);
                }
                let ra = run(&mut a, c.clone());
                let rb = run(&mut b, c);
                prop_assert_eq!(&ra.0, &rb.0);
                prop_assert_eq!(&ra.1, &rb.1);
                prop_assert_eq!(&ra.2.dead_letters, &rb.2.dead_letters);
                prop_assert_eq!(&ra.2.discarded, &rb.2.discarded);
                // No storage: the log is the durability.
                prop_assert!(ra.2.writes.is_empty() && ra.2.releases.is_empty());
                // Every unsettled delivery has one holder, whose count
                // agrees; a consumer given messages is within its prefetch
                // (a checkout again with a lower one takes effect as
                // deliveries settle).
                prop_assert_eq!(a.checked_out.len() as u64, a.queue.unacked_count());
                for (key, c) in &a.consumers {
                    let held = a.checked_out.values().filter(|k| *k == key).count() as u32;
                    prop_assert_eq!(held, c.in_flight);
                    let given = ra.1.iter().any(|e| matches!(e, QuorumEffect::Deliver { consumer, .. } if consumer == key));
                    if given && !c.spec.no_ack && c.spec.prefetch > 0 {
                        prop_assert!(c.in_flight <= c.spec.prefetch);
                    }
                }
                // Dead letters are held, or handed out to route once.
                if a.holds_dead_letters() {
                    prop_assert!(ra.2.dead_letters.is_empty());
                }
                let held = ra.1.iter().filter(|e| matches!(e, QuorumEffect::DeadLetter { .. })).count();
                prop_assert!(held == 0 || a.holds_dead_letters());
                // Nothing ready while an active consumer has credit.
                if a.queue.ready_count() > 0 {
                    prop_assert!(a.next_consumer().is_none());
                }
            }
            prop_assert_eq!(a.snapshot(), b.snapshot());
        }
    }
}
