//! The broker's metadata as commands: what can change ([`MetaCommand`]),
//! the pure state those changes apply to ([`MetaState`]), and where they
//! are committed ([`MetaLog`]).
//!
//! Every change to vhosts, users, permissions, topic permissions, policies,
//! vhost limits and durable exchanges, queues and bindings is a command
//! committed through the broker's `MetaLog`: AMQP methods, the management
//! API, definitions import, `--load-definitions` and boot recovery alike.
//! Only `LocalMetaLog` writes definitions to the store.
//!
//! Inside: `command` (the commands and the one record encoding) and `error`
//! <- `state`
//! (validation, cascades, recovery) <- `log` (commit). Nothing here knows
//! connections, channels or queues' messages; it imports only `policy` (the
//! policy type and its validation) from the rest of the crate.

mod command;
mod error;
mod log;
mod state;

pub use command::{
    Definition, MetaCommand, PermissionDef, QueueDef, TopicPermissionDef, User, VhostLimits,
    binding_key, compile_pattern, policy_def_kind,
};
pub use error::MetaError;
pub use log::{Commit, LocalMetaLog, MetaLog, MetaProjection};
pub use state::{Applied, MetaState, queue_counter};
