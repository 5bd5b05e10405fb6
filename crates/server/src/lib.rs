//! # server
//!
//! Warren's broker: it turns the codec, the router and the queue store into a
//! running AMQP 0-9-1 server.
//!
//! - [`broker`]: configuration, startup (store recovery, listener), shutdown.
//! - [`node`]: what the vhosts and queues share (store, metadata log,
//!   metrics, alarms, settings, tasks), handed to each vhost.
//! - [`alarm`]: memory and disk alarms that block publishers.
//! - [`auth`]: users, password hashes, permissions.
//! - [`connection`]: one task per connection: handshake, frame loop, heartbeats.
//! - [`channel`]: the channel state machine and publisher confirms.
//! - [`meta`]: metadata as commands (`MetaCommand`, `MetaState`, `MetaLog`):
//!   the one path by which definitions change and are persisted.
//! - [`vhost`]: a vhost's router and queues; declare/bind/delete (durable
//!   parts committed through `meta`); dead-letter routing.
//! - [`queue`]: a queue with its consumers and the dispatch loop.
//! - [`outbox`]: a connection's coalescing writer.
//! - [`reply_to`]: direct reply-to (`amq.rabbitmq.reply-to`).
//! - [`tls`]: the AMQPS listener and client-certificate identities.
//! - [`error`]: `AmqpError`, the one place errors become reply codes.
//! - [`definitions`]: export/import in RabbitMQ's definitions JSON.
//! - [`policy`]: policies (`set_policy`) merged into queue arguments.
//! - [`metrics`]: Prometheus metrics with RabbitMQ's names.
//! - [`management`]: the management HTTP API (RabbitMQ's paths and JSON).

pub mod alarm;
pub mod auth;
pub mod broker;
pub mod channel;
pub mod config;
pub mod connection;
pub mod definitions;
pub mod error;
pub mod logging;
pub mod management;
pub mod meta;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod policy;
pub mod queue;
pub mod repair;
pub mod reply_to;
pub mod tls;
pub mod trace;
pub mod vhost;

pub use broker::{Broker, BrokerHandle, Config, StartError, start};
