//! The state of a connection and of its channels that other tasks touch:
//! queues delivering to a consumer's channel, confirms and settlements from
//! other tasks, the direct reply-to registry, the management API's listings.
//! The connection task and the channel state machines (`connection.rs`,
//! `channel/`) own the rest; this module sits below them and below the
//! vhosts and the node, so those can hold what they deliver to without
//! importing the protocol handlers.

mod channel;
mod connection;

pub(crate) use channel::stat;
pub use channel::{CHANNEL_STATS, ChannelModes, ChannelShared};
pub use connection::ConnectionShared;
