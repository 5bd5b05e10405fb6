//! A replicated (quorum) queue's Raft group: its openraft types
//! ([`QueueTypes`]), the log on the node's shared WAL (a
//! [`GroupLog`](crate::group_log::GroupLog) in bincode: entries carry message
//! bodies), and its state machine ([`QueueMachine`]: the queue-store's
//! [`QuorumState`], fed only by committed entries, with a durable snapshot
//! per group that bounds the log).
//!
//! Every replica applies every entry; what applying one asks of the node
//! (deliveries to consumers, dead letters) goes to the replica's
//! [`ReplicaEvents`], which acts on what concerns its own node. The entry's
//! answer (an enqueue accepted or refused, a `basic.get`'s message, a purge's
//! count) goes back to whoever proposed it through openraft's
//! `client_write`, only once a majority has the entry on disk.
//!
//! Its RPCs travel over the links ([`crate::group_net`]); the node starts
//! and reaches its replicas through [`crate::replica`]. This module is the
//! group itself, tested with three replicas in one process.

use std::fmt::Debug;
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};

use amqp_codec::{ContentHeader, FieldTable, ShortStr};
use bytes::{Bytes, BytesMut};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use parking_lot::Mutex;
use queue_store::quorum::{
    ConsumerKey, ConsumerSpec, QuorumCommand, QuorumEffect, QuorumReply, QuorumSnapshot,
    QuorumState, Settlement, SnapshotConsumer,
};
use queue_store::{
    DeadLetterReason, DeadLetterRequest, DeadLetterStrategy, Delivery, Effects, Enqueued,
    ImageEntry, Message, MessageId, MessageRef, Overflow, QueueArgs, QueueImage, QueueType,
};
use serde::{Deserialize, Serialize};

use crate::group_log::SnapshotFile;
use crate::identity::NodeInfo;

openraft::declare_raft_types!(
    /// A replicated queue's group types.
    pub QueueTypes:
        D = QueueRequest,
        R = QueueResponse,
        NodeId = u64,
        Node = NodeInfo,
        Entry = Entry<QueueTypes>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The version of the replicated queue's state machine (what its entries
/// and snapshots mean), reported per member by `quorum_status` as RabbitMQ
/// reports its own. To be raised with any change that would make replicas
/// of two versions apply the same log differently.
pub const MACHINE_VERSION: u64 = 1;

/// Queue groups' records are bincode: compact, and bodies stay raw octets.
impl crate::group_log::LogFormat for QueueTypes {
    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
        bincode::serialize(value).map_err(|e| e.to_string())
    }

    fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
        bincode::deserialize(bytes).map_err(|e| e.to_string())
    }
}

// ---- what the log holds ----

/// A message as the log holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireMessage {
    id: u64,
    exchange: String,
    routing_key: String,
    /// The content header, encoded.
    header: Bytes,
    body: Bytes,
}

impl WireMessage {
    /// The log's form of `message`.
    pub fn of(message: &Message) -> WireMessage {
        let mut header = BytesMut::new();
        message.header.encode(&mut header);
        WireMessage {
            id: message.id.0,
            exchange: message.exchange.to_string(),
            routing_key: message.routing_key.to_string(),
            header: header.freeze(),
            body: message.body.clone(),
        }
    }

    /// A message as a publish brought it (its content header encoded as
    /// on the AMQP wire).
    pub fn from_parts(
        id: u64,
        exchange: String,
        routing_key: String,
        header: Bytes,
        body: Bytes,
    ) -> WireMessage {
        WireMessage {
            id,
            exchange,
            routing_key,
            header,
            body,
        }
    }

    /// The exchange it was published to.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// Its routing key.
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    /// Its content header, encoded.
    pub fn header(&self) -> &Bytes {
        &self.header
    }

    /// Its body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    fn message(&self) -> Result<Arc<Message>, String> {
        let short = |s: &str| ShortStr::try_from(s.to_owned()).map_err(|e| e.to_string());
        let header = ContentHeader::decode(&self.header).map_err(|e| format!("{e:?}"))?;
        Ok(Message::new(
            MessageId(self.id),
            short(&self.exchange)?,
            short(&self.routing_key)?,
            header,
            self.body.clone(),
        ))
    }
}

/// A queue's effective arguments as the log holds them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireArgs {
    message_ttl: Option<u64>,
    expires: Option<u64>,
    max_length: Option<u64>,
    max_length_bytes: Option<u64>,
    /// Low bits: 0 drop-head, 1 reject-publish, 2 reject-publish-dlx.
    /// Bit 7 ([`AT_LEAST_ONCE`]): dead-letter strategy at-least-once. (The
    /// strategy joined this octet later, so that entries and snapshots
    /// written before read as they were: at-most-once unless declared,
    /// which the state machine keeps.)
    overflow: u8,
    dead_letter_exchange: Option<String>,
    dead_letter_routing_key: Option<String>,
    max_priority: Option<u8>,
    delivery_limit: Option<u64>,
    single_active_consumer: bool,
    consumer_timeout: Option<u64>,
}

/// [`WireArgs`]' `overflow` bit for `dead-letter-strategy: at-least-once`.
const AT_LEAST_ONCE: u8 = 0x80;

impl WireArgs {
    /// The log's form of `args`.
    pub fn of(args: &QueueArgs) -> WireArgs {
        WireArgs {
            message_ttl: args.message_ttl,
            expires: args.expires,
            max_length: args.max_length,
            max_length_bytes: args.max_length_bytes,
            overflow: match args.overflow {
                Overflow::DropHead => 0,
                Overflow::RejectPublish => 1,
                Overflow::RejectPublishDlx => 2,
            } | match args.dead_letter_strategy {
                DeadLetterStrategy::AtMostOnce => 0,
                DeadLetterStrategy::AtLeastOnce => AT_LEAST_ONCE,
            },
            dead_letter_exchange: args.dead_letter_exchange.as_ref().map(|s| s.to_string()),
            dead_letter_routing_key: args.dead_letter_routing_key.as_ref().map(|s| s.to_string()),
            max_priority: args.max_priority,
            delivery_limit: args.delivery_limit,
            single_active_consumer: args.single_active_consumer,
            consumer_timeout: args.consumer_timeout,
        }
    }

    fn args(&self) -> Result<QueueArgs, String> {
        let short = |s: &Option<String>| {
            s.as_ref()
                .map(|s| ShortStr::try_from(s.clone()).map_err(|e| e.to_string()))
                .transpose()
        };
        Ok(QueueArgs {
            message_ttl: self.message_ttl,
            expires: self.expires,
            max_length: self.max_length,
            max_length_bytes: self.max_length_bytes,
            overflow: match self.overflow & !AT_LEAST_ONCE {
                0 => Overflow::DropHead,
                1 => Overflow::RejectPublish,
                2 => Overflow::RejectPublishDlx,
                other => return Err(format!("unknown overflow {other}")),
            },
            dead_letter_exchange: short(&self.dead_letter_exchange)?,
            dead_letter_routing_key: short(&self.dead_letter_routing_key)?,
            max_priority: self.max_priority,
            delivery_limit: self.delivery_limit,
            single_active_consumer: self.single_active_consumer,
            consumer_timeout: self.consumer_timeout,
            queue_type: QueueType::Quorum,
            dead_letter_strategy: if self.overflow & AT_LEAST_ONCE == 0 {
                DeadLetterStrategy::AtMostOnce
            } else {
                DeadLetterStrategy::AtLeastOnce
            },
        })
    }
}

fn settlement_octet(how: Settlement) -> u8 {
    match how {
        Settlement::Ack => 0,
        Settlement::Requeue => 1,
        Settlement::Reject => 2,
    }
}

/// One entry of a queue group's log: a [`QuorumCommand`] in wire form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum QueueRequest {
    /// [`QuorumCommand::Enqueue`].
    Enqueue { message: WireMessage, now_ms: u64 },
    /// [`QuorumCommand::Checkout`].
    Checkout {
        consumer: ConsumerKey,
        prefetch: u32,
        no_ack: bool,
        priority: i32,
        now_ms: u64,
    },
    /// [`QuorumCommand::Cancel`].
    Cancel { consumer: ConsumerKey, now_ms: u64 },
    /// [`QuorumCommand::Settle`]; `how` 0 ack, 1 requeue, 2 reject.
    Settle {
        consumer: ConsumerKey,
        seqs: Vec<u64>,
        how: u8,
        now_ms: u64,
    },
    /// [`QuorumCommand::Get`].
    Get {
        requester: ConsumerKey,
        no_ack: bool,
        now_ms: u64,
    },
    /// [`QuorumCommand::Down`].
    Down { consumer: ConsumerKey, now_ms: u64 },
    /// [`QuorumCommand::NodeDown`].
    NodeDown { node: u64, now_ms: u64 },
    /// [`QuorumCommand::NodeUp`].
    NodeUp { node: u64, now_ms: u64 },
    /// [`QuorumCommand::NodeRestarted`].
    NodeRestarted {
        node: u64,
        first_key: u64,
        now_ms: u64,
    },
    /// [`QuorumCommand::Purge`].
    Purge,
    /// [`QuorumCommand::Tick`].
    Tick { now_ms: u64 },
    /// [`QuorumCommand::SetArgs`].
    SetArgs { args: WireArgs, now_ms: u64 },
    /// Several proposals in one entry, applied in order (none of them a
    /// batch): see [`crate::proposals`].
    Batch(Vec<QueueRequest>),
    /// [`QuorumCommand::SettleDeadLetters`]. (After `Batch`: variants are
    /// numbered in order in the log.)
    SettleDeadLetters { ids: Vec<u64> },
}

impl QueueRequest {
    /// When it was proposed (ms since the epoch, the proposer's clock), if
    /// it says: a batch, by its last.
    pub fn proposed_ms(&self) -> Option<u64> {
        match self {
            QueueRequest::Enqueue { now_ms, .. }
            | QueueRequest::Checkout { now_ms, .. }
            | QueueRequest::Cancel { now_ms, .. }
            | QueueRequest::Settle { now_ms, .. }
            | QueueRequest::Get { now_ms, .. }
            | QueueRequest::Down { now_ms, .. }
            | QueueRequest::NodeDown { now_ms, .. }
            | QueueRequest::NodeUp { now_ms, .. }
            | QueueRequest::NodeRestarted { now_ms, .. }
            | QueueRequest::Tick { now_ms }
            | QueueRequest::SetArgs { now_ms, .. } => Some(*now_ms),
            QueueRequest::Batch(requests) => requests.iter().rev().find_map(Self::proposed_ms),
            QueueRequest::Purge | QueueRequest::SettleDeadLetters { .. } => None,
        }
    }

    /// The octets of message (header and body) this entry carries.
    pub fn message_octets(&self) -> u64 {
        match self {
            QueueRequest::Enqueue { message, .. } => {
                (message.body().len() + message.header().len()) as u64
            }
            QueueRequest::Batch(requests) => requests.iter().map(Self::message_octets).sum(),
            _ => 0,
        }
    }

    /// The log's form of `command`.
    pub fn of(command: &QuorumCommand) -> QueueRequest {
        match command {
            QuorumCommand::Enqueue { message, now_ms } => QueueRequest::Enqueue {
                message: WireMessage::of(message),
                now_ms: *now_ms,
            },
            QuorumCommand::Checkout {
                consumer,
                spec,
                now_ms,
            } => QueueRequest::Checkout {
                consumer: *consumer,
                prefetch: spec.prefetch,
                no_ack: spec.no_ack,
                priority: spec.priority,
                now_ms: *now_ms,
            },
            QuorumCommand::Cancel { consumer, now_ms } => QueueRequest::Cancel {
                consumer: *consumer,
                now_ms: *now_ms,
            },
            QuorumCommand::Settle {
                consumer,
                seqs,
                how,
                now_ms,
            } => QueueRequest::Settle {
                consumer: *consumer,
                seqs: seqs.clone(),
                how: settlement_octet(*how),
                now_ms: *now_ms,
            },
            QuorumCommand::Get {
                requester,
                no_ack,
                now_ms,
            } => QueueRequest::Get {
                requester: *requester,
                no_ack: *no_ack,
                now_ms: *now_ms,
            },
            QuorumCommand::Down { consumer, now_ms } => QueueRequest::Down {
                consumer: *consumer,
                now_ms: *now_ms,
            },
            QuorumCommand::NodeDown { node, now_ms } => QueueRequest::NodeDown {
                node: *node,
                now_ms: *now_ms,
            },
            QuorumCommand::NodeUp { node, now_ms } => QueueRequest::NodeUp {
                node: *node,
                now_ms: *now_ms,
            },
            QuorumCommand::NodeRestarted {
                node,
                first_key,
                now_ms,
            } => QueueRequest::NodeRestarted {
                node: *node,
                first_key: *first_key,
                now_ms: *now_ms,
            },
            QuorumCommand::Purge => QueueRequest::Purge,
            QuorumCommand::Tick { now_ms } => QueueRequest::Tick { now_ms: *now_ms },
            QuorumCommand::SetArgs { args, now_ms } => QueueRequest::SetArgs {
                args: WireArgs::of(args),
                now_ms: *now_ms,
            },
            QuorumCommand::SettleDeadLetters { ids } => {
                QueueRequest::SettleDeadLetters { ids: ids.clone() }
            }
        }
    }

    /// The command it carries.
    pub fn command(&self) -> Result<QuorumCommand, String> {
        Ok(match self {
            QueueRequest::Enqueue { message, now_ms } => QuorumCommand::Enqueue {
                message: message.message()?,
                now_ms: *now_ms,
            },
            QueueRequest::Checkout {
                consumer,
                prefetch,
                no_ack,
                priority,
                now_ms,
            } => QuorumCommand::Checkout {
                consumer: *consumer,
                spec: ConsumerSpec {
                    prefetch: *prefetch,
                    no_ack: *no_ack,
                    priority: *priority,
                },
                now_ms: *now_ms,
            },
            QueueRequest::Cancel { consumer, now_ms } => QuorumCommand::Cancel {
                consumer: *consumer,
                now_ms: *now_ms,
            },
            QueueRequest::Settle {
                consumer,
                seqs,
                how,
                now_ms,
            } => QuorumCommand::Settle {
                consumer: *consumer,
                seqs: seqs.clone(),
                how: match how {
                    0 => Settlement::Ack,
                    1 => Settlement::Requeue,
                    2 => Settlement::Reject,
                    other => return Err(format!("unknown settlement {other}")),
                },
                now_ms: *now_ms,
            },
            QueueRequest::Get {
                requester,
                no_ack,
                now_ms,
            } => QuorumCommand::Get {
                requester: *requester,
                no_ack: *no_ack,
                now_ms: *now_ms,
            },
            QueueRequest::Down { consumer, now_ms } => QuorumCommand::Down {
                consumer: *consumer,
                now_ms: *now_ms,
            },
            QueueRequest::NodeDown { node, now_ms } => QuorumCommand::NodeDown {
                node: *node,
                now_ms: *now_ms,
            },
            QueueRequest::NodeUp { node, now_ms } => QuorumCommand::NodeUp {
                node: *node,
                now_ms: *now_ms,
            },
            QueueRequest::NodeRestarted {
                node,
                first_key,
                now_ms,
            } => QuorumCommand::NodeRestarted {
                node: *node,
                first_key: *first_key,
                now_ms: *now_ms,
            },
            QueueRequest::Purge => QuorumCommand::Purge,
            QueueRequest::Tick { now_ms } => QuorumCommand::Tick { now_ms: *now_ms },
            QueueRequest::SetArgs { args, now_ms } => QuorumCommand::SetArgs {
                args: args.args()?,
                now_ms: *now_ms,
            },
            QueueRequest::SettleDeadLetters { ids } => {
                QuorumCommand::SettleDeadLetters { ids: ids.clone() }
            }
            QueueRequest::Batch(_) => return Err("a batch is not one command".into()),
        })
    }
}

/// A delivery as an answer carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireGot {
    /// The queue's sequence number (what settles it).
    pub seq: u64,
    /// The message.
    pub message: WireMessage,
    /// Delivered before.
    pub redelivered: bool,
    /// Times returned (`x-delivery-count`).
    pub delivery_count: u32,
    /// Ready messages left.
    pub remaining: u64,
}

/// The answer to an entry, for its proposer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum QueueResponse {
    /// Nothing to say (also a blank or membership entry).
    #[default]
    Done,
    /// An enqueue taken (`true`) or refused by `x-overflow: reject-publish`.
    Enqueued(bool),
    /// A `basic.get`'s message.
    Got(Option<WireGot>),
    /// Messages purged.
    Purged(u64),
    /// The entry could not be decoded (every replica says the same).
    Invalid(String),
    /// A batch's answers, one per proposal in its order.
    Batch(Vec<QueueResponse>),
}

fn wire_got(d: &Delivery) -> Option<WireGot> {
    match &d.message {
        MessageRef::Loaded(m) => Some(WireGot {
            seq: d.seq,
            message: WireMessage::of(m),
            redelivered: d.redelivered,
            delivery_count: d.delivery_count,
            remaining: d.remaining,
        }),
        // An in-memory queue pages nothing.
        MessageRef::Paged(_) => None,
    }
}

// ---- what a replica does with effects ----

/// Where a replica hands what applying entries asks of its node.
pub trait ReplicaEvents: Send + Sync {
    /// Entries were applied: deliveries assigned to consumers (the node acts
    /// on those of its own consumers) and the dead letters and drops they
    /// caused (the leader routes the dead letters).
    fn applied(&self, deliveries: Vec<QuorumEffect>, effects: Effects);

    /// The messages applied since the last snapshot passed
    /// [`SNAPSHOT_AT_OCTETS`]: a snapshot is due (openraft's policy counts
    /// entries, and an entry may be a batch of 256 KiB). Whether one was
    /// asked for.
    fn snapshot_due(&self) -> bool {
        false
    }
}

/// A replica snapshots once this many octets of messages were applied
/// since its last snapshot (or after openraft's count of entries, whichever
/// comes first), so that the log it keeps in memory stays bounded.
pub const SNAPSHOT_AT_OCTETS: u64 = 64 << 20;

// ---- the state machine ----

/// How a queue's state machine names its queue.
#[derive(Debug, Clone)]
pub struct QueueIdentity {
    /// Its id (in dead letters' bookkeeping).
    pub id: u64,
    /// Its name.
    pub name: ShortStr,
    /// Its declared arguments.
    pub arguments: FieldTable,
    /// Its arguments when declared (a policy may change them by entry).
    pub args: QueueArgs,
}

struct Replica {
    state: QuorumState,
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, NodeInfo>,
}

struct MachineShared {
    identity: QueueIdentity,
    replica: Mutex<Replica>,
    events: OnceLock<Weak<dyn ReplicaEvents>>,
    snapshot: SnapshotFile,
    /// When the next ready message expires (ms since the epoch), as of the
    /// last entry applied: the leader proposes a `Tick` then.
    next_expiry: tokio::sync::watch::Sender<Option<u64>>,
    /// Octets of messages applied since the last snapshot.
    applied_octets: std::sync::atomic::AtomicU64,
    /// A snapshot was asked for and has not been built yet.
    snapshot_asked: std::sync::atomic::AtomicBool,
    /// From its proposal to its application here, of the last entry
    /// applied that says when it was proposed (ms).
    commit_latency_ms: std::sync::atomic::AtomicU64,
}

impl MachineShared {
    /// A snapshot holds everything applied so far.
    fn snapshot_taken(&self) {
        use std::sync::atomic::Ordering;
        self.applied_octets.store(0, Ordering::Relaxed);
        self.snapshot_asked.store(false, Ordering::Relaxed);
    }

    /// Counts `octets` of messages applied; whether a snapshot is due and
    /// not asked for yet.
    fn count_applied(&self, octets: u64) -> bool {
        use std::sync::atomic::Ordering;
        let total = self.applied_octets.fetch_add(octets, Ordering::Relaxed) + octets;
        total >= SNAPSHOT_AT_OCTETS && !self.snapshot_asked.load(Ordering::Relaxed)
    }

    /// Publishes `replica`'s next expiry if it changed.
    fn note_expiry(&self, replica: &Replica) {
        let next = replica.state.queue().next_expiry();
        self.next_expiry.send_if_modified(|known| {
            let changed = *known != next;
            *known = next;
            changed
        });
    }
}

/// A replicated queue's state machine on this node (cheap to clone: a
/// handle).
#[derive(Clone)]
pub struct QueueMachine {
    shared: Arc<MachineShared>,
}

impl Debug for QueueMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueMachine")
            .field("queue", &self.shared.identity.name)
            .finish_non_exhaustive()
    }
}

/// A snapshot file's contents.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    meta: SnapshotMeta<u64, NodeInfo>,
    args: WireArgs,
    next_seq: u64,
    last_used_ms: u64,
    /// (seq, message, expires_at, delivery_count, redelivered)
    ready: Vec<(u64, WireMessage, u64, u32, bool)>,
    unacked: Vec<(u64, WireMessage, u64, u32, bool)>,
    /// (key, prefetch, no_ack, priority, active, suspected, since)
    consumers: Vec<(ConsumerKey, u32, bool, i32, bool, bool, u64)>,
    checked_out: Vec<(u64, ConsumerKey)>,
    registrations: u64,
    /// Held dead letters (`at-least-once`): (number, message, reason,
    /// dead-letter exchange, routing key). Added after the first release
    /// of this format: see [`decode_body`].
    dead_letters: Vec<(u64, WireMessage, u8, String, Option<String>)>,
    next_dead_letter: u64,
}

/// [`SnapshotBody`] as written before dead letters could be held.
#[derive(Deserialize)]
struct SnapshotBodyV1 {
    meta: SnapshotMeta<u64, NodeInfo>,
    args: WireArgs,
    next_seq: u64,
    last_used_ms: u64,
    ready: Vec<(u64, WireMessage, u64, u32, bool)>,
    unacked: Vec<(u64, WireMessage, u64, u32, bool)>,
    consumers: Vec<(ConsumerKey, u32, bool, i32, bool, bool, u64)>,
    checked_out: Vec<(u64, ConsumerKey)>,
    registrations: u64,
}

/// A snapshot file's contents, in either format (an earlier one ends
/// before the held dead letters: reading it as the current one runs out).
fn decode_body(bytes: &[u8]) -> Result<SnapshotBody, bincode::Error> {
    match bincode::deserialize::<SnapshotBody>(bytes) {
        Ok(body) => Ok(body),
        Err(current) => match bincode::deserialize::<SnapshotBodyV1>(bytes) {
            Ok(v1) => Ok(SnapshotBody {
                meta: v1.meta,
                args: v1.args,
                next_seq: v1.next_seq,
                last_used_ms: v1.last_used_ms,
                ready: v1.ready,
                unacked: v1.unacked,
                consumers: v1.consumers,
                checked_out: v1.checked_out,
                registrations: v1.registrations,
                dead_letters: Vec::new(),
                next_dead_letter: 0,
            }),
            Err(_) => Err(current),
        },
    }
}

fn reason_octet(reason: DeadLetterReason) -> u8 {
    match reason {
        DeadLetterReason::Rejected => 0,
        DeadLetterReason::Expired => 1,
        DeadLetterReason::MaxLen => 2,
        DeadLetterReason::DeliveryLimit => 3,
    }
}

fn wire_dead_letters(
    held: &[(u64, DeadLetterRequest)],
) -> Vec<(u64, WireMessage, u8, String, Option<String>)> {
    held.iter()
        .filter_map(|(id, r)| match &r.message {
            MessageRef::Loaded(m) => Some((
                *id,
                WireMessage::of(m),
                reason_octet(r.reason),
                r.exchange.to_string(),
                r.routing_key.as_ref().map(|k| k.to_string()),
            )),
            // An in-memory queue pages nothing out.
            MessageRef::Paged(_) => None,
        })
        .collect()
}

fn held_dead_letters(
    queue: &ShortStr,
    wire: &[(u64, WireMessage, u8, String, Option<String>)],
) -> Result<Vec<(u64, DeadLetterRequest)>, String> {
    let short = |s: &str| ShortStr::try_from(s.to_owned()).map_err(|e| e.to_string());
    wire.iter()
        .map(|(id, m, reason, exchange, routing_key)| {
            Ok((
                *id,
                DeadLetterRequest {
                    message: MessageRef::Loaded(m.message()?),
                    reason: match reason {
                        0 => DeadLetterReason::Rejected,
                        1 => DeadLetterReason::Expired,
                        2 => DeadLetterReason::MaxLen,
                        3 => DeadLetterReason::DeliveryLimit,
                        other => return Err(format!("unknown dead-letter reason {other}")),
                    },
                    queue: queue.clone(),
                    exchange: short(exchange)?,
                    routing_key: routing_key.as_deref().map(short).transpose()?,
                },
            ))
        })
        .collect()
}

fn wire_entries(entries: &[ImageEntry]) -> Vec<(u64, WireMessage, u64, u32, bool)> {
    entries
        .iter()
        .map(|e| {
            (
                e.seq,
                WireMessage::of(&e.message),
                e.expires_at,
                e.delivery_count,
                e.redelivered,
            )
        })
        .collect()
}

fn image_entries(
    entries: &[(u64, WireMessage, u64, u32, bool)],
) -> Result<Vec<ImageEntry>, String> {
    entries
        .iter()
        .map(|(seq, m, expires_at, delivery_count, redelivered)| {
            Ok(ImageEntry {
                seq: *seq,
                message: m.message()?,
                expires_at: *expires_at,
                delivery_count: *delivery_count,
                redelivered: *redelivered,
            })
        })
        .collect()
}

fn body_of(replica: &Replica) -> SnapshotBody {
    let s = replica.state.snapshot();
    let id = replica.last_applied.map_or_else(
        || "empty".to_owned(),
        |l| format!("{}-{}", l.leader_id, l.index),
    );
    SnapshotBody {
        meta: SnapshotMeta {
            last_log_id: replica.last_applied,
            last_membership: replica.membership.clone(),
            snapshot_id: id,
        },
        args: WireArgs::of(&s.args),
        next_seq: s.queue.next_seq,
        last_used_ms: s.queue.last_used_ms,
        ready: wire_entries(&s.queue.ready),
        unacked: wire_entries(&s.queue.unacked),
        consumers: s
            .consumers
            .iter()
            .map(|c| {
                (
                    c.key,
                    c.spec.prefetch,
                    c.spec.no_ack,
                    c.spec.priority,
                    c.active,
                    c.suspected,
                    c.since,
                )
            })
            .collect(),
        checked_out: s.checked_out,
        registrations: s.registrations,
        dead_letters: wire_dead_letters(&s.dead_letters),
        next_dead_letter: s.next_dead_letter,
    }
}

fn replica_from(identity: &QueueIdentity, body: &SnapshotBody) -> Result<Replica, String> {
    let snapshot = QuorumSnapshot {
        args: body.args.args()?,
        queue: QueueImage {
            next_seq: body.next_seq,
            last_used_ms: body.last_used_ms,
            ready: image_entries(&body.ready)?,
            unacked: image_entries(&body.unacked)?,
        },
        consumers: body
            .consumers
            .iter()
            .map(
                |&(key, prefetch, no_ack, priority, active, suspected, since)| SnapshotConsumer {
                    key,
                    spec: ConsumerSpec {
                        prefetch,
                        no_ack,
                        priority,
                    },
                    active,
                    suspected,
                    since,
                },
            )
            .collect(),
        checked_out: body.checked_out.clone(),
        registrations: body.registrations,
        dead_letters: held_dead_letters(&identity.name, &body.dead_letters)?,
        next_dead_letter: body.next_dead_letter,
    };
    Ok(Replica {
        state: QuorumState::restore(
            identity.id,
            identity.name.clone(),
            identity.arguments.clone(),
            snapshot,
        ),
        last_applied: body.meta.last_log_id,
        membership: body.meta.last_membership.clone(),
    })
}

/// Applies one proposal to `state`: its answer.
fn apply_one(
    state: &mut QuorumState,
    request: &QueueRequest,
    effects: &mut Effects,
    deliveries: &mut Vec<QuorumEffect>,
) -> QueueResponse {
    let command = match request.command() {
        Ok(c) => c,
        Err(e) => return QueueResponse::Invalid(e),
    };
    match state.apply(command, effects, deliveries) {
        QuorumReply::Done => QueueResponse::Done,
        QuorumReply::Enqueued(e) => QueueResponse::Enqueued(e == Enqueued::Accepted),
        QuorumReply::Got(d) => QueueResponse::Got(d.as_ref().and_then(wire_got)),
        QuorumReply::Purged(n) => QueueResponse::Purged(n),
    }
}

fn io_err<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl QueueMachine {
    /// The state machine of the queue `identity`, from its last snapshot
    /// at `snapshot_path` if there is one.
    pub fn open(identity: QueueIdentity, snapshot_path: PathBuf) -> Result<QueueMachine, String> {
        let snapshot = SnapshotFile::new(snapshot_path);
        let at = |e: &dyn std::fmt::Display| format!("{}: {e}", snapshot.path().display());
        let replica = match snapshot.read().map_err(|e| at(&e))? {
            Some(bytes) => {
                let body = decode_body(&bytes).map_err(|e| at(&e))?;
                replica_from(&identity, &body)?
            }
            None => Replica {
                state: QuorumState::new(
                    identity.id,
                    identity.name.clone(),
                    identity.args.clone(),
                    identity.arguments.clone(),
                    0,
                ),
                last_applied: None,
                membership: StoredMembership::default(),
            },
        };
        Ok(QueueMachine {
            shared: Arc::new(MachineShared {
                identity,
                next_expiry: tokio::sync::watch::Sender::new(replica.state.queue().next_expiry()),
                replica: Mutex::new(replica),
                events: OnceLock::new(),
                snapshot,
                applied_octets: std::sync::atomic::AtomicU64::new(0),
                snapshot_asked: std::sync::atomic::AtomicBool::new(false),
                commit_latency_ms: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// Where effects go from now on.
    pub fn set_events(&self, events: Weak<dyn ReplicaEvents>) {
        let _ = self.shared.events.set(events);
    }

    /// From its proposal to its application here, of the last entry applied
    /// that says when it was proposed (ms; 0 before any).
    pub fn commit_latency_ms(&self) -> u64 {
        self.shared
            .commit_latency_ms
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads the state (counts, consumers) under its lock.
    pub fn with_state<R>(&self, f: impl FnOnce(&QuorumState) -> R) -> R {
        f(&self.shared.replica.lock().state)
    }

    /// When the next ready message expires (ms since the epoch), and
    /// whenever that changes.
    pub fn next_expiry(&self) -> tokio::sync::watch::Receiver<Option<u64>> {
        self.shared.next_expiry.subscribe()
    }

    /// The last applied index.
    pub fn applied_index(&self) -> u64 {
        self.shared
            .replica
            .lock()
            .last_applied
            .map_or(0, |l| l.index)
    }

    async fn write_snapshot(&self, body: &SnapshotBody) -> Result<Vec<u8>, StorageError<u64>> {
        let bytes = bincode::serialize(body)
            .map_err(|e| StorageIOError::write_snapshot(None, &io_err(e)))?;
        self.shared.snapshot.write(bytes.clone()).await?;
        Ok(bytes)
    }
}

impl RaftSnapshotBuilder<QueueTypes> for QueueMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<QueueTypes>, StorageError<u64>> {
        let body = {
            let r = self.shared.replica.lock();
            self.shared.snapshot_taken();
            body_of(&r)
        };
        let bytes = self.write_snapshot(&body).await?;
        Ok(Snapshot {
            meta: body.meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<QueueTypes> for QueueMachine {
    type SnapshotBuilder = QueueMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, NodeInfo>), StorageError<u64>> {
        let r = self.shared.replica.lock();
        Ok((r.last_applied, r.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<QueueResponse>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<QueueTypes>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut deliveries = Vec::new();
        let mut effects = Effects::default();
        let mut octets = 0u64;
        {
            let mut r = self.shared.replica.lock();
            let mut proposed = None;
            for entry in entries {
                if let EntryPayload::Normal(request) = &entry.payload {
                    octets += request.message_octets();
                    proposed = request.proposed_ms().or(proposed);
                }
                tracing::trace!(target: "latency", index = entry.log_id.index, "apply");
                r.last_applied = Some(entry.log_id);
                let response = match entry.payload {
                    EntryPayload::Blank => QueueResponse::Done,
                    EntryPayload::Membership(m) => {
                        r.membership = StoredMembership::new(Some(entry.log_id), m);
                        QueueResponse::Done
                    }
                    EntryPayload::Normal(QueueRequest::Batch(requests)) => QueueResponse::Batch(
                        requests
                            .iter()
                            .map(|q| apply_one(&mut r.state, q, &mut effects, &mut deliveries))
                            .collect(),
                    ),
                    EntryPayload::Normal(request) => {
                        apply_one(&mut r.state, &request, &mut effects, &mut deliveries)
                    }
                };
                out.push(response);
            }
            if let Some(proposed) = proposed {
                self.shared.commit_latency_ms.store(
                    server::queue::now_ms().saturating_sub(proposed),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            self.shared.note_expiry(&r);
        }
        let events = self.shared.events.get().and_then(Weak::upgrade);
        if !(deliveries.is_empty() && effects.is_empty()) {
            if let Some(events) = &events {
                events.applied(deliveries, effects);
            }
        }
        if self.shared.count_applied(octets) {
            if let Some(events) = &events {
                if events.snapshot_due() {
                    self.shared
                        .snapshot_asked
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let bytes = snapshot.into_inner();
        let mut body = decode_body(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &io_err(e)))?;
        body.meta = meta.clone();
        let fresh = replica_from(&self.shared.identity, &body)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &io_err(e)))?;
        self.write_snapshot(&body).await?;
        self.shared.note_expiry(&fresh);
        *self.shared.replica.lock() = fresh;
        self.shared.snapshot_taken();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<QueueTypes>>, StorageError<u64>> {
        match self.shared.snapshot.read() {
            Ok(Some(bytes)) => {
                let body = decode_body(&bytes)
                    .map_err(|e| StorageIOError::read_snapshot(None, &io_err(e)))?;
                Ok(Some(Snapshot {
                    meta: body.meta,
                    snapshot: Box::new(Cursor::new(bytes)),
                }))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(StorageIOError::read_snapshot(None, &e).into()),
        }
    }
}

/// What the tests of queue groups share: a queue's identity, a member's
/// address, a persistent message, and waits for a leader and for an index
/// applied.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use amqp_codec::{BasicProperties, class_id};

    pub(crate) fn identity() -> QueueIdentity {
        QueueIdentity {
            id: 1,
            name: ShortStr::from_static("q"),
            arguments: FieldTable::default(),
            args: QueueArgs {
                queue_type: QueueType::Quorum,
                ..QueueArgs::default()
            },
        }
    }

    pub(crate) fn node(id: u64) -> NodeInfo {
        NodeInfo {
            id,
            name: format!("n{id}@test"),
            cluster_addr: format!("n{id}:25672"),
            amqp_addr: format!("n{id}:5672"),
        }
    }

    pub(crate) fn message(n: u64) -> QueueRequest {
        message_with(n, Bytes::copy_from_slice(&n.to_be_bytes()))
    }

    /// An enqueue of persistent message `n` with body `body`.
    pub(crate) fn message_with(n: u64, body: Bytes) -> QueueRequest {
        let header = ContentHeader {
            class_id: class_id::BASIC,
            weight: 0,
            body_size: body.len() as u64,
            properties: BasicProperties {
                delivery_mode: Some(2),
                ..BasicProperties::default()
            }
            .to_raw()
            .unwrap(),
        };
        let m = Message::new(
            MessageId(n),
            ShortStr::from_static(""),
            ShortStr::from_static("q"),
            header,
            body,
        );
        QueueRequest::of(&QuorumCommand::Enqueue {
            message: m,
            now_ms: n,
        })
    }

    /// The leader `raft`'s replica sees, once it sees one other than `not`.
    pub(crate) async fn leader_seen_by(raft: &openraft::Raft<QueueTypes>, not: Option<u64>) -> u64 {
        raft.wait(Some(std::time::Duration::from_secs(10)))
            .metrics(
                |m| m.current_leader.is_some() && m.current_leader != not,
                "a leader",
            )
            .await
            .expect("no leader elected")
            .current_leader
            .expect("a leader")
    }

    /// Waits until `raft`'s replica has applied `index`.
    pub(crate) async fn applied(raft: &openraft::Raft<QueueTypes>, index: u64) {
        raft.wait(Some(std::time::Duration::from_secs(10)))
            .applied_index_at_least(Some(index), "applied")
            .await
            .expect("not applied in time");
    }
}

#[cfg(test)]
mod tests {
    //! Three replicas of one queue group in one process, over a network
    //! that calls the target's `Raft` directly (and can cut a replica off),
    //! each with its own WAL and snapshot file in a temporary directory.

    use super::test_support::{applied, identity, leader_seen_by, message, message_with, node};
    use super::*;
    use crate::group_log::GroupLog;
    use crate::raft_wal::RaftWal;
    use openraft::Raft;
    use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    use openraft::raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
        InstallSnapshotResponse, VoteRequest, VoteResponse,
    };
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    const GROUP: u64 = 7;

    #[derive(Default)]
    struct Router {
        rafts: Mutex<BTreeMap<u64, Raft<QueueTypes>>>,
        /// Replicas cut off from every other.
        cut: Mutex<BTreeSet<u64>>,
    }

    #[derive(Clone)]
    struct Factory {
        router: Arc<Router>,
        from: u64,
    }

    struct Net {
        router: Arc<Router>,
        from: u64,
        target: u64,
    }

    impl RaftNetworkFactory<QueueTypes> for Factory {
        type Network = Net;
        async fn new_client(&mut self, target: u64, _node: &NodeInfo) -> Net {
            Net {
                router: self.router.clone(),
                from: self.from,
                target,
            }
        }
    }

    impl Net {
        // openraft's error type is large; it is what the network returns.
        #[allow(clippy::result_large_err)]
        fn raft<E: std::error::Error>(
            &self,
        ) -> Result<Raft<QueueTypes>, RPCError<u64, NodeInfo, E>> {
            let cut = self.router.cut.lock();
            let unreachable =
                || RPCError::Unreachable(Unreachable::new(&std::io::Error::other("cut off")));
            if cut.contains(&self.from) || cut.contains(&self.target) {
                return Err(unreachable());
            }
            self.router
                .rafts
                .lock()
                .get(&self.target)
                .cloned()
                .ok_or_else(unreachable)
        }
    }

    impl RaftNetwork<QueueTypes> for Net {
        async fn append_entries(
            &mut self,
            rpc: AppendEntriesRequest<QueueTypes>,
            _option: RPCOption,
        ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
            let raft = self.raft()?;
            raft.append_entries(rpc)
                .await
                .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
        }

        async fn install_snapshot(
            &mut self,
            rpc: InstallSnapshotRequest<QueueTypes>,
            _option: RPCOption,
        ) -> Result<
            InstallSnapshotResponse<u64>,
            RPCError<u64, NodeInfo, RaftError<u64, InstallSnapshotError>>,
        > {
            let raft = self.raft()?;
            raft.install_snapshot(rpc)
                .await
                .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
        }

        async fn vote(
            &mut self,
            rpc: VoteRequest<u64>,
            _option: RPCOption,
        ) -> Result<VoteResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
            let raft = self.raft()?;
            raft.vote(rpc)
                .await
                .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
        }
    }

    /// Deliveries a replica was told of, by consumer, and how often it
    /// asked for a snapshot.
    #[derive(Default)]
    struct Seen {
        deliveries: Mutex<Vec<(ConsumerKey, u64)>>,
        snapshots_asked: std::sync::atomic::AtomicUsize,
    }

    impl ReplicaEvents for Seen {
        fn applied(&self, deliveries: Vec<QuorumEffect>, _effects: Effects) {
            let mut seen = self.deliveries.lock();
            for effect in deliveries {
                if let QuorumEffect::Deliver { consumer, delivery } = effect {
                    seen.push((consumer, delivery.seq));
                }
            }
        }

        fn snapshot_due(&self) -> bool {
            self.snapshots_asked
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            true
        }
    }

    #[tokio::test]
    async fn a_replica_asks_for_a_snapshot_each_time_its_messages_since_the_last_pass_64_mib() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = QueueMachine::open(identity(), dir.path().join("q.snapshot")).unwrap();
        let seen = Arc::new(Seen::default());
        let events: Arc<dyn ReplicaEvents> = seen.clone();
        machine.set_events(Arc::downgrade(&events));
        let mib = Bytes::from(vec![0u8; 1 << 20]);
        let asked = || {
            seen.snapshots_asked
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let mut index = 0;
        let mut apply = async |machine: &mut QueueMachine, n: u64| {
            for _ in 0..n {
                index += 1;
                let entry = Entry {
                    log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
                    payload: EntryPayload::Normal(message_with(index, mib.clone())),
                };
                machine.apply([entry]).await.unwrap();
            }
        };
        // 63 MiB of bodies (and their headers): not yet.
        apply(&mut machine, 63).await;
        assert_eq!(asked(), 0);
        // Past 64 MiB: asked once, and not again until a snapshot is built.
        apply(&mut machine, 2).await;
        assert_eq!(asked(), 1);
        apply(&mut machine, 10).await;
        assert_eq!(asked(), 1);
        machine.build_snapshot().await.unwrap();
        apply(&mut machine, 63).await;
        assert_eq!(asked(), 1);
        apply(&mut machine, 2).await;
        assert_eq!(asked(), 2);
    }

    struct Replica {
        raft: Raft<QueueTypes>,
        machine: QueueMachine,
        wal: RaftWal,
        seen: Arc<Seen>,
    }

    async fn start(router: &Arc<Router>, dir: &std::path::Path, id: u64) -> Replica {
        let dir = dir.join(format!("n{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (wal, _) = RaftWal::open(&dir).unwrap();
        let machine = QueueMachine::open(identity(), dir.join("q.snapshot")).unwrap();
        let seen = Arc::new(Seen::default());
        let events: Arc<dyn ReplicaEvents> = seen.clone();
        machine.set_events(Arc::downgrade(&events));
        let config = openraft::Config {
            heartbeat_interval: 50,
            election_timeout_min: 200,
            election_timeout_max: 400,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(20),
            max_in_snapshot_log_to_keep: 0,
            purge_batch_size: 1,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let raft = Raft::new(
            id,
            Arc::new(config),
            Factory {
                router: router.clone(),
                from: id,
            },
            GroupLog::<QueueTypes>::new(wal.clone(), GROUP),
            machine.clone(),
        )
        .await
        .unwrap();
        router.rafts.lock().insert(id, raft.clone());
        Replica {
            raft,
            machine,
            wal,
            seen,
        }
    }

    /// The leader, once a replica other than `not` sees one that is not `not`.
    async fn leader(replicas: &BTreeMap<u64, Replica>, not: Option<u64>) -> u64 {
        let (_, watcher) = replicas
            .iter()
            .find(|(id, _)| Some(**id) != not)
            .expect("a replica");
        leader_seen_by(&watcher.raft, not).await
    }

    async fn applied_everywhere(replicas: &BTreeMap<u64, Replica>, index: u64) {
        for r in replicas.values() {
            applied(&r.raft, index).await;
        }
    }

    /// Three replicas of one group, initialised by the first, in a fresh
    /// directory (kept alive by the caller).
    async fn three_replicas() -> (tempfile::TempDir, Arc<Router>, BTreeMap<u64, Replica>) {
        let dir = tempfile::tempdir().unwrap();
        let router = Arc::new(Router::default());
        let mut replicas = BTreeMap::new();
        for id in 1..=3 {
            replicas.insert(id, start(&router, dir.path(), id).await);
        }
        let members: BTreeMap<u64, NodeInfo> = (1..=3).map(|id| (id, node(id))).collect();
        replicas[&1].raft.initialize(members).await.unwrap();
        (dir, router, replicas)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_agree_survive_a_leader_cut_off_and_restart_from_snapshot_and_log() {
        let (dir, router, mut replicas) = three_replicas().await;
        let first = leader(&replicas, None).await;

        // A consumer on node 2 with a prefetch of 10; 25 messages.
        let checkout = QueueRequest::of(&QuorumCommand::Checkout {
            consumer: (2, 1),
            spec: ConsumerSpec {
                prefetch: 10,
                no_ack: false,
                priority: 0,
            },
            now_ms: 0,
        });
        replicas[&first].raft.client_write(checkout).await.unwrap();
        for n in 1..=25 {
            let r = replicas[&first]
                .raft
                .client_write(message(n))
                .await
                .unwrap();
            assert_eq!(r.data, QueueResponse::Enqueued(true));
        }
        // Every replica computed the same ten deliveries to node 2's consumer.
        let index = replicas[&first].machine.applied_index();
        applied_everywhere(&replicas, index).await;
        let expected: Vec<(ConsumerKey, u64)> = (1..=10).map(|seq| ((2, 1), seq)).collect();
        for r in replicas.values() {
            assert_eq!(*r.seen.deliveries.lock(), expected);
            assert_eq!(r.machine.with_state(|s| s.queue().ready_count()), 15);
        }

        // The leader is cut off: the other two elect one and go on; what
        // the old leader is asked now is not committed.
        router.cut.lock().insert(first);
        let second = leader(&replicas, Some(first)).await;
        assert_ne!(second, first);
        let settle = QueueRequest::of(&QuorumCommand::Settle {
            consumer: (2, 1),
            seqs: (1..=10).collect(),
            how: Settlement::Ack,
            now_ms: 30,
        });
        replicas[&second].raft.client_write(settle).await.unwrap();
        let lost = tokio::time::timeout(
            Duration::from_millis(500),
            replicas[&first].raft.client_write(message(999)),
        )
        .await;
        assert!(
            !matches!(lost, Ok(Ok(_))),
            "a cut-off leader committed an entry"
        );
        for n in 26..=60 {
            replicas[&second]
                .raft
                .client_write(message(n))
                .await
                .unwrap();
        }

        // Healed: the old leader catches up (log or snapshot) and agrees.
        router.cut.lock().clear();
        let index = replicas[&second].machine.applied_index();
        applied_everywhere(&replicas, index).await;
        let counts = |r: &Replica| {
            r.machine
                .with_state(|s| (s.queue().ready_count(), s.queue().unacked_count()))
        };
        let want = counts(&replicas[&second]);
        assert_eq!(want, (40, 10), "15 left + 35 new - 10 more delivered");
        for r in replicas.values() {
            assert_eq!(counts(r), want);
        }

        // Snapshots were taken and the logs purged below them.
        let snap = dir.path().join(format!("n{second}")).join("q.snapshot");
        assert!(snap.exists(), "no snapshot at {}", snap.display());
        assert!(replicas[&second].wal.group(GROUP).purged.is_some());

        // A replica restarted from its snapshot and WAL has the same state.
        let restarted = 3;
        let old = replicas.remove(&restarted).unwrap();
        old.raft.shutdown().await.unwrap();
        old.wal.close();
        router.rafts.lock().remove(&restarted);
        let fresh = start(&router, dir.path(), restarted).await;
        applied(&fresh.raft, index).await;
        assert_eq!(counts(&fresh), want);
        for r in replicas.values() {
            r.raft.shutdown().await.unwrap();
        }
        fresh.raft.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proposals_queued_together_commit_as_batches_in_order_each_with_its_answer() {
        let (_dir, _router, replicas) = three_replicas().await;
        let l = leader(&replicas, None).await;
        let before = replicas[&l].machine.applied_index();
        let proposer =
            crate::proposals::Proposer::start(replicas[&l].raft.clone(), Duration::from_secs(10));
        // 200 enqueues with a basic.get among them, proposed at once.
        let get = QueueRequest::of(&QuorumCommand::Get {
            requester: (1, 0),
            no_ack: true,
            now_ms: 1,
        });
        let mut answers = Vec::new();
        for n in 1..=200u64 {
            answers.push(proposer.propose(message(n)));
            if n == 100 {
                answers.push(proposer.propose(get.clone()));
            }
        }
        let mut outcomes = Vec::new();
        for a in answers {
            outcomes.push(a.await);
        }
        for (i, o) in outcomes.iter().enumerate() {
            let crate::proposals::Attempt::Done(Ok(r)) = o else {
                panic!("proposal {i}: {o:?}");
            };
            if i == 100 {
                // The get came after the first hundred: it took the first.
                let QueueResponse::Got(Some(got)) = r else {
                    panic!("the get answered {r:?}");
                };
                assert_eq!(got.seq, 1);
                assert_eq!(&got.message.body()[..], &1u64.to_be_bytes());
            } else {
                assert_eq!(*r, QueueResponse::Enqueued(true), "proposal {i}");
            }
        }
        // Fewer entries than proposals, and every replica has the 199
        // left in the order proposed.
        let index = replicas[&l].machine.applied_index();
        assert!(index - before < 201, "{} entries", index - before);
        applied_everywhere(&replicas, index).await;
        for r in replicas.values() {
            let ids: Vec<u64> = r.machine.with_state(|s| {
                s.queue()
                    .image()
                    .unwrap()
                    .ready
                    .iter()
                    .map(|e| e.message.id.0)
                    .collect()
            });
            assert_eq!(ids, (2..=200).collect::<Vec<u64>>());
        }
        drop(proposer);
        for r in replicas.values() {
            r.raft.shutdown().await.unwrap();
        }
    }

    #[test]
    fn a_request_survives_the_wire() {
        let r = message(5);
        let b = <QueueTypes as crate::group_log::LogFormat>::encode(&r).unwrap();
        let back: QueueRequest = <QueueTypes as crate::group_log::LogFormat>::decode(&b).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.command().unwrap(), r.command().unwrap());
        let batch = QueueRequest::Batch(vec![message(1), message(2)]);
        let b = <QueueTypes as crate::group_log::LogFormat>::encode(&batch).unwrap();
        let back: QueueRequest = <QueueTypes as crate::group_log::LogFormat>::decode(&b).unwrap();
        assert_eq!(back, batch);
        assert!(
            batch.command().is_err(),
            "a batch is applied proposal by proposal"
        );
        let args = QueueArgs {
            max_length: Some(3),
            overflow: Overflow::RejectPublishDlx,
            dead_letter_exchange: Some(ShortStr::from_static("dlx")),
            queue_type: QueueType::Quorum,
            ..QueueArgs::default()
        };
        assert_eq!(WireArgs::of(&args).args().unwrap(), args);
        let held = QueueArgs {
            dead_letter_strategy: DeadLetterStrategy::AtLeastOnce,
            ..args
        };
        let wire = WireArgs::of(&held);
        assert_eq!(wire.overflow, 2 | AT_LEAST_ONCE);
        assert_eq!(wire.args().unwrap(), held);
    }
}
