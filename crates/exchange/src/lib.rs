//! # exchange
//!
//! Warren's router: for one published message, the exact set of queues it
//! reaches. A pure library (no I/O, no async) over `amqp-codec`'s types, so
//! routing is easy to test and fast.
//!
//! ## Layout
//! - [`router`]: [`Router`], one vhost's exchanges, bindings and known queues;
//!   declare / delete / bind / unbind with RabbitMQ's checks and error texts,
//!   and [`Router::route`] with exchange-to-exchange bindings, alternate
//!   exchanges and `CC`/`BCC` sender-selected distribution.
//! - `matcher`: the per-type binding sets (direct: key → queues; fanout: all).
//! - `topic`: the topic trie; `headers`: `x-match` matching.
//! - [`error`]: [`ExchangeError`], with reply codes.
//!
//! ## Routing
//! ```
//! use amqp_codec::{FieldTable, ShortStr};
//! use exchange::{BindingDef, Destination, QueueId, Routed, Router};
//!
//! let mut router = Router::new(ShortStr::from_static("/"));
//! router.add_queue(ShortStr::from_static("orders"), QueueId(7));
//! router.bind(&BindingDef {
//!     source: ShortStr::from_static("amq.topic"),
//!     destination: Destination::Queue(ShortStr::from_static("orders")),
//!     routing_key: ShortStr::from_static("order.*"),
//!     arguments: FieldTable::new(),
//! })?;
//! let mut routed = Routed::default(); // reuse it: routing then allocates nothing
//! router.route("amq.topic", "order.created", None, &mut routed)?;
//! assert_eq!(routed.queues(), [QueueId(7)]);
//! # Ok::<(), exchange::ExchangeError>(())
//! ```

mod binding;
pub mod error;
mod headers;
mod matcher;
pub mod router;
mod topic;

pub use binding::{ExchangeKind, QueueId};
pub use error::ExchangeError;
pub use router::{
    BindingDef, Destination, ExchangeDeclare, ExchangeDef, Removed, RouteHop, RouteTrace, Routed,
    Router, SYSTEM_EXCHANGES,
};
