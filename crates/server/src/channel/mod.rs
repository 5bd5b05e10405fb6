//! Channels: the per-channel state machine, owned by its connection's task.
//! A method reaches its handler, `handle_<class>_<method>`, through the
//! table in [`Channel::dispatch`]; each AMQP class has a file:
//!
//! | file | what lives there |
//! |---|---|
//! | `mod.rs` | `Channel`, its states and mode, `channel.*` methods, name resolution, permission checks, release |
//! | `shared.rs` | [`ChannelShared`]: what queues and other tasks touch (delivery tags, unacked and transaction-held deliveries, prefetch, writing frames) |
//! | `exchange.rs` | `exchange.*` |
//! | `queue.rs` | `queue.*` |
//! | `basic.rs` | `basic.*`: publish, consume, get, settle, recover, the consumer timeout |
//! | `confirm.rs` | `confirm.select` and publisher confirms |
//! | `tx.rs` | `tx.*` |
//!
//! ```text
//!   channel.open ──▶ Open ──(client channel.close)──▶ closed (close-ok sent)
//!                     │
//!                     └──(soft error: server channel.close)──▶ Closing
//!                            └── only channel.close / close-ok accepted ──▶ closed
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ::exchange::Routed;
use amqp_codec::methods::*;
use amqp_codec::{Command, CommandAssembler, Method, ShortStr};
use queue_store::Effects;

use crate::auth::{Access, AuthzCache, Resource};
use crate::error::AmqpError;
use crate::node::Node;
use crate::queue::QueueHandle;
use crate::session::ConnectionShared;
use crate::vhost::Vhost;

mod basic;
mod confirm;
mod exchange;
mod queue;
mod remote;
mod tx;

pub use crate::queue::{Settle, Unacked};
pub use crate::session::ChannelShared;

use confirm::Confirms;
use tx::TxAction;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// The broker sent `channel.close`; waiting for `close-ok`.
    Closing,
}

/// What a channel does with publishes: route them (plain), route and
/// confirm them (`confirm.select`), or hold them with acknowledgements
/// until `tx.commit` (`tx.select`). A channel in one mode cannot switch to
/// the other.
#[derive(Debug)]
enum Mode {
    Plain,
    Confirm(Confirms),
    Transactional(Vec<TxAction>),
}

/// A channel's state machine.
#[derive(Debug)]
pub struct Channel {
    /// Shared part.
    pub shared: Arc<ChannelShared>,
    /// Frame → command.
    pub assembler: CommandAssembler,
    state: State,
    /// Plain, publisher confirms, or transactional.
    mode: Mode,
    /// Prefetch for consumers started from now on (`basic.qos` global=false).
    prefetch: u16,
    /// This channel's consumers: tag → queue.
    consumers: Vec<(ShortStr, Arc<QueueHandle>)>,
    /// Its consumers of queues on other nodes: tag → (home node, key).
    remote_consumers: Vec<(ShortStr, String, u64)>,
    /// Enqueues on other nodes made by the transaction being committed:
    /// `tx.commit-ok` waits for them.
    tx_remote: Vec<crate::peers::Pending>,
    routed: Routed,
    fx: Effects,
    /// This channel's direct reply-to consumer: (token, consumer tag).
    reply_consumer: Option<(String, ShortStr)>,
    /// Which consumer's queue dispatches first next time the channel's
    /// credit comes back (see [`Vhost::dispatch_channel`]).
    dispatch_turn: AtomicUsize,
    /// The queue this channel declared last (empty: none yet), which an
    /// empty queue name stands for.
    last_queue: ShortStr,
    /// Operations this channel was allowed (see [`AuthzCache`]).
    authz: parking_lot::Mutex<AuthzCache>,
}

/// A server-chosen name: `prefix` and 22 random characters (128 bits,
/// unique without coordination, across nodes too).
fn server_name(prefix: &str) -> ShortStr {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    let suffix: String = (0..22)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    ShortStr::try_from(format!("{prefix}{suffix}")).unwrap_or_default()
}

impl Channel {
    /// A newly opened channel.
    pub fn new(id: u16, connection: Arc<ConnectionShared>, max_body: u64) -> Channel {
        Channel {
            shared: ChannelShared::new(id, connection),
            assembler: CommandAssembler::new(max_body),
            state: State::Open,
            mode: Mode::Plain,
            prefetch: 0,
            consumers: Vec::new(),
            remote_consumers: Vec::new(),
            tx_remote: Vec::new(),
            routed: Routed::default(),
            fx: Effects::default(),
            reply_consumer: None,
            dispatch_turn: AtomicUsize::new(0),
            last_queue: ShortStr::default(),
            authz: parking_lot::Mutex::new(AuthzCache::default()),
        }
    }

    /// The queue an empty name stands for: the channel's last declared one
    /// (the spec's rule, which RabbitMQ implements), 404 if there is none.
    fn queue_name(&self, name: ShortStr) -> Result<ShortStr, AmqpError> {
        if !name.is_empty() {
            return Ok(name);
        }
        if self.last_queue.is_empty() {
            return Err(AmqpError::not_found("no previously declared queue"));
        }
        Ok(self.last_queue.clone())
    }

    /// Resolves the names a method carries as RabbitMQ does before acting on
    /// them: `\r` and `\n` are stripped from the queue and exchange names of
    /// declares, binds, unbinds and deletes (not of publishes, gets,
    /// consumes or purges); an empty queue name is the last declared queue,
    /// and `queue.bind` / `queue.unbind` with an empty queue and routing key
    /// use that queue's name as the key.
    fn resolve_names(&self, method: &mut Method) -> Result<(), AmqpError> {
        // (In place: a publish, the hot path, passes through untouched.)
        let strip = |name: &mut ShortStr| *name = strip_cr_lf(std::mem::take(name));
        let expand = |name: &mut ShortStr| -> Result<(), AmqpError> {
            *name = self.queue_name(std::mem::take(name))?;
            Ok(())
        };
        match method {
            Method::QueueDeclare(m) => strip(&mut m.queue),
            Method::ExchangeDeclare(m) => strip(&mut m.exchange),
            Method::ExchangeDelete(m) => strip(&mut m.exchange),
            Method::ExchangeBind(m) => {
                strip(&mut m.source);
                strip(&mut m.destination);
            }
            Method::ExchangeUnbind(m) => {
                strip(&mut m.source);
                strip(&mut m.destination);
            }
            Method::QueueBind(m) => {
                let shortcut = m.queue.is_empty();
                strip(&mut m.queue);
                expand(&mut m.queue)?;
                strip(&mut m.exchange);
                if shortcut && m.routing_key.is_empty() {
                    m.routing_key = m.queue.clone();
                }
            }
            Method::QueueUnbind(m) => {
                let shortcut = m.queue.is_empty();
                strip(&mut m.queue);
                expand(&mut m.queue)?;
                strip(&mut m.exchange);
                if shortcut && m.routing_key.is_empty() {
                    m.routing_key = m.queue.clone();
                }
            }
            Method::QueueDelete(m) => {
                strip(&mut m.queue);
                expand(&mut m.queue)?;
            }
            Method::QueuePurge(m) => expand(&mut m.queue)?,
            Method::BasicConsume(m) => expand(&mut m.queue)?,
            Method::BasicGet(m) => expand(&mut m.queue)?,
            _ => {}
        }
        Ok(())
    }

    /// Lets every queue this channel consumes from deliver, starting with
    /// the next in turn.
    fn dispatch_all(&self, vhost: &Vhost) {
        let start = self.dispatch_turn.fetch_add(1, Ordering::Relaxed);
        vhost.dispatch_channel(&self.consumers, start);
    }

    /// Checks the connection's user may do `access` on a resource (403 if not).
    fn allow(
        &self,
        node: &Node,
        vhost: &Vhost,
        resource: Resource,
        name: &str,
        access: Access,
    ) -> Result<(), AmqpError> {
        // The default exchange is "amq.default" to permissions, as in RabbitMQ.
        let name = if resource == Resource::Exchange && name.is_empty() {
            "amq.default"
        } else {
            name
        };
        node.auth.check_cached(
            &mut self.authz.lock(),
            &self.shared.connection.user,
            vhost.name(),
            resource,
            name,
            access,
        )
    }

    /// Lets the queues this channel consumes from deliver again.
    pub fn redispatch(&mut self, vhost: &Vhost) {
        let shared = self.shared.clone();
        self.consumers.retain(|(t, _)| shared.has_consumer(t));
        self.dispatch_all(vhost);
    }

    /// Whether the broker closed this channel and awaits `close-ok`.
    pub fn is_closing(&self) -> bool {
        self.state == State::Closing
    }

    /// Sends `channel.close` for a soft error and stops processing until `close-ok`.
    pub fn fail(&mut self, node: &Arc<Node>, vhost: &Vhost, e: &AmqpError) {
        tracing::info!(channel = self.shared.id, error = %e, "closing channel");
        self.release(node, vhost);
        // Nothing follows channel.close: unconfirmed publishes stay
        // unconfirmed, a transaction is gone.
        self.mode = Mode::Plain;
        self.state = State::Closing;
        self.assembler.reset();
        self.shared
            .write_method(&Method::ChannelClose(ChannelClose {
                reply_code: e.code,
                reply_text: ShortStr::try_from(e.reply_text()).unwrap_or_default(),
                class_id: e.class_id,
                method_id: e.method_id,
            }));
    }

    /// Cancels consumers and requeues unacknowledged messages (channel or
    /// connection closing).
    pub fn release(&mut self, node: &Arc<Node>, vhost: &Vhost) {
        self.shared.mark_closed();
        if let Some((token, _)) = self.reply_consumer.take() {
            node.reply_consumers.unregister(&token);
        }
        for (tag, queue) in std::mem::take(&mut self.consumers) {
            vhost.cancel_consumer(&queue, &tag);
        }
        if let Some(peers) = node.peers.get() {
            for (_, home, key) in std::mem::take(&mut self.remote_consumers) {
                peers.cancel(&home, key);
            }
        }
        let unacked = self.shared.take_all();
        vhost.settle(unacked, Settle::Requeue);
    }

    /// Handles one complete command, waiting if its handler waits.
    pub async fn handle(
        &mut self,
        node: &Arc<Node>,
        vhost: &Arc<Vhost>,
        cmd: Command,
    ) -> Result<ChannelOutcome, AmqpError> {
        match self.handle_now(node, vhost, cmd) {
            Handled::Done(outcome) => outcome,
            Handled::Waits(cmd) => Box::pin(self.handle_waiting(node, vhost, cmd)).await,
        }
    }

    /// Handles one complete command if its handler does not wait (publish,
    /// ack, qos, ...: every frame's path, so no future is made for it: a
    /// future per command, copied as it was made, was the largest single
    /// cost of S1). A command whose handler waits comes back as
    /// [`Handled::Waits`], for [`handle_waiting`](Self::handle_waiting).
    pub fn handle_now(&mut self, node: &Arc<Node>, vhost: &Arc<Vhost>, cmd: Command) -> Handled {
        let (class_id, method_id) = (cmd.method.class_id(), cmd.method.method_id());
        if self.state == State::Closing {
            // The broker sent channel.close. A client channel.close that
            // crossed it is answered, and the channel stays known until the
            // client's close-ok for ours arrives (as RabbitMQ's reader does),
            // so that close-ok is not mistaken for a stray one (504).
            // Everything else is dropped.
            return Handled::Done(Ok(match cmd.method {
                Method::ChannelCloseOk(_) => ChannelOutcome::Closed,
                Method::ChannelClose(_) => {
                    self.shared
                        .write_method(&Method::ChannelCloseOk(ChannelCloseOk {}));
                    ChannelOutcome::Open
                }
                // Reopening before the close-ok: the channel is still open
                // as far as the broker knows (RabbitMQ's 504).
                Method::ChannelOpen(_) => {
                    return Handled::Done(Err(AmqpError::channel_error(
                        "second 'channel.open' seen",
                    )
                    .on(ChannelOpen::CLASS_ID, ChannelOpen::METHOD_ID)));
                }
                _ => ChannelOutcome::Open,
            }));
        }
        if waits(&cmd.method) {
            return Handled::Waits(cmd);
        }
        Handled::Done(
            self.dispatch_now(node, vhost, cmd)
                .map_err(|e| on_method(e, class_id, method_id)),
        )
    }

    /// Handles a command that [`handle_now`](Self::handle_now) gave back.
    pub async fn handle_waiting(
        &mut self,
        node: &Arc<Node>,
        vhost: &Arc<Vhost>,
        cmd: Command,
    ) -> Result<ChannelOutcome, AmqpError> {
        let (class_id, method_id) = (cmd.method.class_id(), cmd.method.method_id());
        self.dispatch_waiting(node, vhost, cmd)
            .await
            .map_err(|e| on_method(e, class_id, method_id))
    }

    /// One method whose handler does not wait, to its handler
    /// (`handle_<class>_<method>`, in the file of its class).
    fn dispatch_now(
        &mut self,
        node: &Arc<Node>,
        vhost: &Arc<Vhost>,
        cmd: Command,
    ) -> Result<ChannelOutcome, AmqpError> {
        let Command {
            mut method,
            content,
        } = cmd;
        self.resolve_names(&mut method)?;
        match method {
            Method::ChannelClose(_) => return Ok(self.handle_channel_close(node, vhost)),
            Method::ChannelCloseOk(_) => {
                return Err(AmqpError::command_invalid("unexpected channel.close-ok"));
            }
            Method::ChannelOpen(_) => {
                return Err(AmqpError::channel_error("second 'channel.open' seen"));
            }
            Method::ChannelFlow(m) => self.handle_channel_flow(m)?,
            Method::ChannelFlowOk(_) => {}
            Method::AccessRequest(_) => self
                .shared
                .write_method(&Method::AccessRequestOk(AccessRequestOk { ticket: 1 })),
            Method::BasicQos(m) => self.handle_basic_qos(node, vhost, m)?,
            Method::BasicCancel(m) => self.handle_basic_cancel(node, vhost, m),
            Method::BasicPublish(m) => self.handle_basic_publish(node, vhost, m, content)?,
            Method::BasicAck(m) => self.handle_basic_ack(node, vhost, m)?,
            Method::BasicNack(m) => self.handle_basic_nack(node, vhost, m)?,
            Method::BasicReject(m) => self.handle_basic_reject(node, vhost, m)?,
            Method::BasicRecover(m) => self.handle_basic_recover(node, vhost, m)?,
            Method::BasicRecoverAsync(m) => self.handle_basic_recover_async(node, vhost, m)?,
            Method::ConfirmSelect(m) => self.handle_confirm_select(m)?,
            Method::TxSelect(_) => self.handle_tx_select()?,
            Method::TxRollback(_) => self.handle_tx_rollback()?,
            other => {
                return Err(AmqpError::command_invalid(format!(
                    "unexpected method {} on a channel",
                    other.name()
                )));
            }
        }
        Ok(ChannelOutcome::Open)
    }

    /// One method whose handler waits (declares, binds, deletes, consume,
    /// get, commit: rare, and some wait on other nodes), to its handler.
    async fn dispatch_waiting(
        &mut self,
        node: &Arc<Node>,
        vhost: &Arc<Vhost>,
        cmd: Command,
    ) -> Result<ChannelOutcome, AmqpError> {
        let mut method = cmd.method;
        self.resolve_names(&mut method)?;
        match method {
            Method::ExchangeDeclare(m) => self.handle_exchange_declare(node, vhost, m).await?,
            Method::ExchangeDelete(m) => self.handle_exchange_delete(node, vhost, m).await?,
            Method::ExchangeBind(m) => self.handle_exchange_bind(node, vhost, m).await?,
            Method::ExchangeUnbind(m) => self.handle_exchange_unbind(node, vhost, m).await?,
            Method::QueueDeclare(m) => Box::pin(self.handle_queue_declare(node, vhost, m)).await?,
            Method::QueueBind(m) => self.handle_queue_bind(node, vhost, m).await?,
            Method::QueueUnbind(m) => self.handle_queue_unbind(node, vhost, m).await?,
            Method::QueuePurge(m) => self.handle_queue_purge(node, vhost, m).await?,
            Method::QueueDelete(m) => self.handle_queue_delete(node, vhost, m).await?,
            Method::BasicConsume(m) => Box::pin(self.handle_basic_consume(node, vhost, m)).await?,
            Method::BasicGet(m) => self.handle_basic_get(node, vhost, m).await?,
            Method::TxCommit(_) => Box::pin(self.handle_tx_commit(node, vhost)).await?,
            // (`waits` and these arms list the same methods.)
            other => {
                return Err(AmqpError::internal(format!(
                    "{} is not a waiting method",
                    other.name()
                )));
            }
        }
        Ok(ChannelOutcome::Open)
    }

    /// `channel.close` from the client: confirms already due go out before
    /// the close-ok; nothing after it.
    fn handle_channel_close(&mut self, node: &Arc<Node>, vhost: &Vhost) -> ChannelOutcome {
        self.flush_confirms(node);
        self.release(node, vhost);
        self.shared
            .write_method(&Method::ChannelCloseOk(ChannelCloseOk {}));
        ChannelOutcome::Closed
    }

    /// `channel.flow` from the client. RabbitMQ 3.x refuses `active=false`
    /// with 540 (a connection error) rather than pausing deliveries as the
    /// spec describes; clients rely on RabbitMQ, so Warren does the same
    /// (consumers pause with `basic.qos` or `basic.cancel` instead).
    fn handle_channel_flow(&mut self, m: ChannelFlow) -> Result<(), AmqpError> {
        if !m.active {
            return Err(AmqpError::not_implemented("active=false"));
        }
        self.shared
            .write_method(&Method::ChannelFlowOk(ChannelFlowOk { active: true }));
        Ok(())
    }
}

/// What [`Channel::handle_now`] came to.
#[derive(Debug)]
pub enum Handled {
    /// Handled (or refused) without waiting.
    Done(Result<ChannelOutcome, AmqpError>),
    /// The command's handler waits: [`Channel::handle_waiting`] takes it.
    Waits(Command),
}

/// Whether a method's handler waits (for a commit, another node or the
/// store): [`Channel::dispatch_waiting`]'s methods.
fn waits(method: &Method) -> bool {
    matches!(
        method,
        Method::ExchangeDeclare(_)
            | Method::ExchangeDelete(_)
            | Method::ExchangeBind(_)
            | Method::ExchangeUnbind(_)
            | Method::QueueDeclare(_)
            | Method::QueueBind(_)
            | Method::QueueUnbind(_)
            | Method::QueuePurge(_)
            | Method::QueueDelete(_)
            | Method::BasicConsume(_)
            | Method::BasicGet(_)
            | Method::TxCommit(_)
    )
}

/// An error that names no method names the one it answers.
fn on_method(e: AmqpError, class_id: u16, method_id: u16) -> AmqpError {
    if e.class_id == 0 {
        e.on(class_id, method_id)
    } else {
        e
    }
}

/// A name without `\r` and `\n` (RabbitMQ strips them from declared
/// names, so they never reach a log line either). No copy when there are none.
fn strip_cr_lf(name: ShortStr) -> ShortStr {
    if !name.bytes().any(|b| b == b'\r' || b == b'\n') {
        return name;
    }
    let kept: String = name.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    ShortStr::try_from(kept).unwrap_or_default()
}

impl Settle {
    /// `basic.nack` / `basic.reject`'s `requeue` flag.
    fn requeue_or_reject(requeue: bool) -> Settle {
        if requeue {
            Settle::Requeue
        } else {
            Settle::Reject
        }
    }
}

/// What a handled command did to the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelOutcome {
    /// Still open.
    Open,
    /// Closed (close-ok sent or received): forget it.
    Closed,
}
