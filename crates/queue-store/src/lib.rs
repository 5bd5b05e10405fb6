//! # queue-store
//!
//! Queues and everything that must survive a restart. Two halves:
//!
//! - **Queue semantics** ([`queue`]): [`Queue`] is a pure state machine with
//!   RabbitMQ's behaviour — FIFO with requeue to the original position,
//!   `x-message-ttl` and per-message `expiration` (expiry at the head),
//!   `x-max-length`/`x-max-length-bytes` with `x-overflow`, dead-lettering with
//!   RabbitMQ's `x-death` header ([`dead_letter`]), `x-delivery-limit`,
//!   priorities, and paging of bodies past a memory budget. Arguments are
//!   parsed and validated in [`args`]. Time is an argument, never read from a clock.
//! - **Durability** ([`store`], [`storage`]): [`Store`] persists definitions
//!   (in sled) and persistent messages of durable queues (in a log of segment
//!   files), behind the [`Storage`] trait, through one writer thread with
//!   group commit, and [`Store::commit`] is the commit point: a future that
//!   resolves only after fsync. Message bodies are stored once and
//!   reference-counted across queues by the engine.
//! - **Memory**: a deep queue keeps a window of entries in memory and spills
//!   the rest to anonymous files ([`Queue::set_spill_dir`]); the engine keeps
//!   a word per stored body and about a bit per index entry.
//!
//! The durability contract, what is written when and what survives a crash,
//! is spelled out in this crate's README.

pub mod args;
pub mod damage;
pub mod dead_letter;
pub mod definitions;
pub mod error;
pub mod flow;
mod index_runs;
pub mod message;
pub mod queue;
pub mod quorum;
mod removal_journal;
mod segment_file;
pub mod segment_log;
mod spill;
pub mod storage;
pub mod store;

pub use args::{DeadLetterStrategy, Overflow, QueueArgs, QueueType};
pub use damage::{Damage, RepairReport};
pub use dead_letter::{DeadLetter, DeadLetterReason};
pub use definitions::{DefKind, scoped_name};
pub use error::{ArgError, ArgProblem, StoreError};
pub use flow::FlowGate;
pub use message::{Message, MessageId};
pub use queue::{
    DeadLetterRequest, Delivery, Effects, Enqueued, ImageEntry, MessageRef, Queue, QueueImage,
    SpillIo, SpillIoDone, SpilledRemoval, parse_expiration,
};
pub use segment_log::SegmentLogStorage;
pub use storage::{IndexEntry, MessageCensus, Storage, Write};
pub use store::{DEFAULT_BACKLOG_LIMIT, Recovered, Store, StoreStats};
