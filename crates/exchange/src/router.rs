//! [`Router`]: one vhost's exchanges, bindings and the queues they may reach,
//! and [`Router::route`], which computes the set of queues one message reaches.
//!
//! The server owns one router per vhost and treats it as read-mostly data
//! (routing takes `&self`; declare/bind/delete take `&mut self`). Queues are
//! known by name (for the default exchange and for binding) and by the
//! caller's opaque [`QueueId`], which is what routing returns.
//!
//! Routing follows exchange-to-exchange bindings breadth-first with a visited
//! set, so cycles terminate and each exchange is evaluated once; an exchange
//! that routes to nothing passes the message to its alternate exchange; queues
//! are reported once however many paths lead to them. All scratch space lives
//! in the caller's [`Routed`], so steady-state routing does not allocate.
//! Each exchange counts what was published to it and how many queue copies
//! that made (RabbitMQ's `publish_in` / `publish_out`): two relaxed atomic
//! adds per publish.

// Fx hashing: keys are names and ids; routing and binding are hot paths.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use std::sync::atomic::{AtomicU64, Ordering};

use amqp_codec::{FieldTable, FieldValue, ShortStr};
use bytes::{Bytes, BytesMut};

use crate::binding::{ExchangeIdx, ExchangeKind, QueueId, Target};
use crate::error::ExchangeError;
use crate::headers::type_name;
use crate::matcher::Matcher;
use crate::topic::TopicScratch;

/// The exchanges every vhost has, which clients cannot declare or delete,
/// with their type and whether they are internal. `amq.rabbitmq.trace` is
/// the firehose's exchange (internal: only the broker publishes to it).
pub const SYSTEM_EXCHANGES: [(&str, ExchangeKind, bool); 6] = [
    ("amq.direct", ExchangeKind::Direct, false),
    ("amq.fanout", ExchangeKind::Fanout, false),
    ("amq.topic", ExchangeKind::Topic, false),
    ("amq.headers", ExchangeKind::Headers, false),
    ("amq.match", ExchangeKind::Headers, false),
    ("amq.rabbitmq.trace", ExchangeKind::Topic, true),
];

/// An exchange's declared properties.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeDef {
    /// Name (never empty: the default exchange is implicit).
    pub name: ShortStr,
    /// Type.
    pub kind: ExchangeKind,
    /// Survives a broker restart (the server persists it).
    pub durable: bool,
    /// Deleted when its last binding as a source goes away.
    pub auto_delete: bool,
    /// Cannot be published to directly, only through e2e bindings.
    pub internal: bool,
    /// Declare arguments (`alternate-exchange`, ...).
    pub arguments: FieldTable,
}

/// Where a binding leads, by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    /// A queue (`queue.bind`).
    Queue(ShortStr),
    /// An exchange (`exchange.bind`).
    Exchange(ShortStr),
}

/// A binding, by names, as declared.
#[derive(Debug, Clone, PartialEq)]
pub struct BindingDef {
    /// The exchange messages come from.
    pub source: ShortStr,
    /// Where they go.
    pub destination: Destination,
    /// Binding key (pattern for topic exchanges).
    pub routing_key: ShortStr,
    /// Binding arguments (`x-match` and header values for headers exchanges).
    pub arguments: FieldTable,
}

impl BindingDef {
    /// The name of the queue or exchange it leads to.
    pub fn destination_name(&self) -> &ShortStr {
        match &self.destination {
            Destination::Queue(n) | Destination::Exchange(n) => n,
        }
    }
}

/// What a delete or unbind took away, for the caller to persist and report.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Removed {
    /// Bindings removed.
    pub bindings: Vec<BindingDef>,
    /// Exchanges deleted, including auto-delete exchanges whose last binding went.
    pub exchanges: Vec<ExchangeDef>,
}

/// The result of routing one message, and scratch space reused between calls.
#[derive(Debug, Default)]
pub struct Routed {
    queues: Vec<QueueId>,
    bcc: bool,
    targets: Vec<crate::binding::Target>,
    work: Vec<ExchangeIdx>,
    seen: Vec<ExchangeIdx>,
    topic: TopicScratch,
    marks: DedupMarks,
}

impl Routed {
    /// The queues the message reaches, each once, in the order first reached.
    pub fn queues(&self) -> &[QueueId] {
        &self.queues
    }

    /// Whether the message reaches no queue (→ `basic.return` if mandatory).
    pub fn is_unroutable(&self) -> bool {
        self.queues.is_empty()
    }

    /// Whether the message has a `BCC` header, which must be removed before delivery.
    pub fn has_bcc(&self) -> bool {
        self.bcc
    }
}

/// Identity of a binding: source, target, key and encoded arguments.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BindingKey {
    source: ExchangeIdx,
    target: Target,
    routing_key: ShortStr,
    args: Bytes,
}

#[derive(Debug)]
struct Exchange {
    def: ExchangeDef,
    alternate: Option<ShortStr>,
    matcher: Matcher,
    system: bool,
    traffic: Traffic,
}

/// Messages published to an exchange, and the queue copies they made
/// (RabbitMQ's `publish_in` and `publish_out`). Dead letters are not
/// publishes and are not counted.
#[derive(Debug, Default)]
struct Traffic {
    published_in: AtomicU64,
    routed_out: AtomicU64,
}

impl Traffic {
    fn count(&self, copies: usize) {
        self.published_in.fetch_add(1, Ordering::Relaxed);
        self.routed_out.fetch_add(copies as u64, Ordering::Relaxed);
    }

    fn get(&self) -> [u64; 2] {
        [
            self.published_in.load(Ordering::Relaxed),
            self.routed_out.load(Ordering::Relaxed),
        ]
    }
}

/// The routing table of one vhost.
#[derive(Debug)]
pub struct Router {
    vhost: ShortStr,
    /// The default exchange's counts (it is implicit, not in `exchanges`).
    default_traffic: Traffic,
    exchanges: Vec<Option<Exchange>>,
    free: Vec<u32>,
    by_name: HashMap<ShortStr, ExchangeIdx>,
    queues: HashMap<ShortStr, QueueId>,
    queue_names: HashMap<QueueId, ShortStr>,
    bindings: HashMap<BindingKey, FieldTable>,
    by_source: HashMap<ExchangeIdx, HashSet<BindingKey>>,
    by_target: HashMap<Target, HashSet<BindingKey>>,
}

fn encode_args(args: &FieldTable) -> Bytes {
    let mut buf = BytesMut::new();
    // A table that came off the wire re-encodes; one that cannot be encoded
    // cannot have come from a peer, and keys as empty.
    if args.encode(&mut buf).is_err() {
        buf.clear();
    }
    buf.freeze()
}

fn quoted(v: bool) -> String {
    format!("'{v}'")
}

fn describe_arg(v: Option<&FieldValue>) -> String {
    match v {
        None => "none".to_owned(),
        Some(v) => {
            let shown = match v {
                FieldValue::LongStr(s) => String::from_utf8_lossy(s).into_owned(),
                other => other
                    .as_i64()
                    .map_or_else(|| format!("{other:?}"), |n| n.to_string()),
            };
            format!("the value '{shown}' of type '{}'", type_name(v))
        }
    }
}

impl Router {
    /// A routing table for `vhost` with the system exchanges declared.
    pub fn new(vhost: ShortStr) -> Router {
        let mut router = Router {
            vhost,
            default_traffic: Traffic::default(),
            exchanges: Vec::new(),
            free: Vec::new(),
            by_name: HashMap::default(),
            queues: HashMap::default(),
            queue_names: HashMap::default(),
            bindings: HashMap::default(),
            by_source: HashMap::default(),
            by_target: HashMap::default(),
        };
        for (name, kind, internal) in SYSTEM_EXCHANGES {
            let def = ExchangeDef {
                name: ShortStr::from_static(name),
                kind,
                durable: true,
                auto_delete: false,
                internal,
                arguments: FieldTable::new(),
            };
            router.insert_exchange(def, true);
        }
        router
    }

    /// The vhost this table belongs to.
    pub fn vhost(&self) -> &ShortStr {
        &self.vhost
    }

    fn not_found(&self, exchange: &str) -> ExchangeError {
        ExchangeError::ExchangeNotFound {
            exchange: exchange.to_owned(),
            vhost: self.vhost.to_string(),
        }
    }

    fn get(&self, idx: ExchangeIdx) -> Option<&Exchange> {
        self.exchanges.get(idx.0 as usize).and_then(Option::as_ref)
    }

    fn get_mut(&mut self, idx: ExchangeIdx) -> Option<&mut Exchange> {
        self.exchanges
            .get_mut(idx.0 as usize)
            .and_then(Option::as_mut)
    }

    fn insert_exchange(&mut self, def: ExchangeDef, system: bool) {
        let alternate = match def.arguments.get("alternate-exchange") {
            Some(FieldValue::LongStr(s)) => ShortStr::from_bytes(s.clone()).ok(),
            _ => None,
        };
        let name = def.name.clone();
        let exchange = Exchange {
            matcher: Matcher::new(def.kind),
            def,
            alternate,
            system,
            traffic: Traffic::default(),
        };
        let idx = match self.free.pop() {
            Some(i) => {
                if let Some(slot) = self.exchanges.get_mut(i as usize) {
                    *slot = Some(exchange);
                }
                ExchangeIdx(i)
            }
            None => {
                self.exchanges.push(Some(exchange));
                ExchangeIdx((self.exchanges.len() - 1) as u32)
            }
        };
        self.by_name.insert(name, idx);
    }

    /// The exchange called `name`, if declared.
    pub fn exchange(&self, name: &str) -> Option<&ExchangeDef> {
        let idx = *self.by_name.get(name)?;
        self.get(idx).map(|x| &x.def)
    }

    /// Sets the alternate exchange a policy gives exchange `name`: it applies
    /// unless the exchange's own `alternate-exchange` argument names one (the
    /// argument wins, as in RabbitMQ). `None` removes the policy's.
    pub fn set_policy_alternate(&mut self, name: &str, alternate: Option<ShortStr>) {
        let Some(&idx) = self.by_name.get(name) else {
            return;
        };
        if let Some(x) = self.get_mut(idx) {
            let own = match x.def.arguments.get("alternate-exchange") {
                Some(FieldValue::LongStr(s)) => ShortStr::from_bytes(s.clone()).ok(),
                _ => None,
            };
            x.alternate = own.or(alternate);
        }
    }

    /// Every declared exchange (the default exchange is implicit and not listed).
    pub fn exchanges(&self) -> impl Iterator<Item = &ExchangeDef> {
        self.exchanges.iter().flatten().map(|x| &x.def)
    }

    /// Messages published to `exchange` (`""`: the default exchange) and
    /// the queue copies they made; `None` if there is no such exchange.
    pub fn traffic(&self, exchange: &str) -> Option<[u64; 2]> {
        if exchange.is_empty() {
            return Some(self.default_traffic.get());
        }
        let idx = *self.by_name.get(exchange)?;
        self.get(idx).map(|x| x.traffic.get())
    }

    /// [`traffic`](Self::traffic) of every exchange, the default one (`""`)
    /// first.
    pub fn all_traffic(&self) -> impl Iterator<Item = (&str, [u64; 2])> {
        std::iter::once(("", self.default_traffic.get())).chain(
            self.exchanges
                .iter()
                .flatten()
                .map(|x| (x.def.name.as_str(), x.traffic.get())),
        )
    }

    /// Declares an exchange (`exchange.declare`). Returns whether it was created.
    ///
    /// `kind` is the type as the client sent it. A redeclare must match the
    /// existing exchange's type, flags and `alternate-exchange`; a passive
    /// declare only checks existence.
    pub fn declare_exchange(
        &mut self,
        def: ExchangeDeclare<'_>,
        passive: bool,
    ) -> Result<bool, ExchangeError> {
        if def.name.is_empty() {
            return Err(ExchangeError::DefaultExchange);
        }
        if passive {
            return match self.exchange(def.name) {
                Some(_) => Ok(false),
                None => Err(self.not_found(def.name)),
            };
        }
        let kind = ExchangeKind::parse(def.kind)?;
        if let Some(existing) = self.exchange(def.name) {
            self.check_equivalent(existing, kind, &def)?;
            return Ok(false);
        }
        if def.name.starts_with("amq.") {
            return Err(ExchangeError::ReservedName(def.name.to_owned()));
        }
        if let Some(ae) = def.arguments.get("alternate-exchange") {
            if !matches!(ae, FieldValue::LongStr(s) if s.len() <= ShortStr::MAX_LEN) {
                return Err(ExchangeError::InvalidArgType {
                    arg: "alternate-exchange",
                    type_name: type_name(ae),
                    exchange: def.name.to_owned(),
                    vhost: self.vhost.to_string(),
                });
            }
        }
        let name = ShortStr::try_from(def.name)
            .map_err(|_| ExchangeError::ReservedName(def.name.to_owned()))?;
        self.insert_exchange(
            ExchangeDef {
                name,
                kind,
                durable: def.durable,
                auto_delete: def.auto_delete,
                internal: def.internal,
                arguments: def.arguments.clone(),
            },
            false,
        );
        Ok(true)
    }

    fn check_equivalent(
        &self,
        existing: &ExchangeDef,
        kind: ExchangeKind,
        def: &ExchangeDeclare<'_>,
    ) -> Result<(), ExchangeError> {
        let inequivalent = |arg, received: String, current: String| ExchangeError::Inequivalent {
            arg,
            exchange: def.name.to_owned(),
            vhost: self.vhost.to_string(),
            received,
            current,
        };
        if existing.kind != kind {
            return Err(inequivalent(
                "type",
                format!("'{kind}'"),
                format!("'{}'", existing.kind),
            ));
        }
        for (arg, received, current) in [
            ("durable", def.durable, existing.durable),
            ("auto_delete", def.auto_delete, existing.auto_delete),
            ("internal", def.internal, existing.internal),
        ] {
            if received != current {
                return Err(inequivalent(arg, quoted(received), quoted(current)));
            }
        }
        let received = def.arguments.get("alternate-exchange");
        let current = existing.arguments.get("alternate-exchange");
        if received != current {
            return Err(inequivalent(
                "alternate-exchange",
                describe_arg(received),
                describe_arg(current),
            ));
        }
        Ok(())
    }

    /// Deletes an exchange (`exchange.delete`) and every binding from or to it.
    /// Deleting a missing exchange is not an error (RabbitMQ).
    pub fn delete_exchange(
        &mut self,
        name: &str,
        if_unused: bool,
    ) -> Result<Removed, ExchangeError> {
        if name.is_empty() {
            return Err(ExchangeError::DefaultExchange);
        }
        let Some(&idx) = self.by_name.get(name) else {
            return Ok(Removed::default());
        };
        if self.get(idx).is_some_and(|x| x.system) {
            return Err(ExchangeError::SystemExchange {
                exchange: name.to_owned(),
                vhost: self.vhost.to_string(),
            });
        }
        if if_unused && self.by_source.get(&idx).is_some_and(|b| !b.is_empty()) {
            return Err(ExchangeError::InUse {
                exchange: name.to_owned(),
                vhost: self.vhost.to_string(),
            });
        }
        let mut removed = Removed::default();
        self.remove_exchange(idx, &mut removed);
        Ok(removed)
    }

    fn remove_exchange(&mut self, idx: ExchangeIdx, removed: &mut Removed) {
        let from: Vec<BindingKey> = self
            .by_source
            .get(&idx)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        let to: Vec<BindingKey> = self
            .by_target
            .get(&Target::Exchange(idx))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for key in from {
            self.remove_binding(&key, removed, false);
        }
        // Bindings to this exchange: removing them may auto-delete their
        // sources (never this exchange again: its own bindings are gone).
        for key in to {
            self.remove_binding(&key, removed, true);
        }
        self.by_target.remove(&Target::Exchange(idx));
        self.by_source.remove(&idx);
        let Some(exchange) = self
            .exchanges
            .get_mut(idx.0 as usize)
            .and_then(Option::take)
        else {
            return;
        };
        self.by_name.remove(&exchange.def.name);
        self.free.push(idx.0);
        removed.exchanges.push(exchange.def);
    }

    /// Registers a queue so the default exchange routes to it by name and
    /// bindings can name it.
    pub fn add_queue(&mut self, name: ShortStr, id: QueueId) {
        self.queue_names.insert(id, name.clone());
        self.queues.insert(name, id);
    }

    /// The id of the queue called `name`.
    pub fn queue(&self, name: &str) -> Option<QueueId> {
        self.queues.get(name).copied()
    }

    /// Forgets a queue and removes its bindings (queue deleted).
    pub fn remove_queue(&mut self, id: QueueId) -> Removed {
        let mut removed = Removed::default();
        let keys: Vec<BindingKey> = self
            .by_target
            .remove(&Target::Queue(id))
            .map(|s| s.into_iter().collect())
            .unwrap_or_default();
        for key in keys {
            self.remove_binding(&key, &mut removed, true);
        }
        if let Some(name) = self.queue_names.remove(&id) {
            self.queues.remove(&name);
        }
        removed
    }

    /// Gives queue `name` a new id, keeping its bindings (a classic queue
    /// that became replicated: from now on messages route to `id`). No
    /// exchange is auto-deleted on the way. A queue not known is added.
    pub fn replace_queue(&mut self, name: ShortStr, id: QueueId) {
        let Some(old) = self.queue(&name) else {
            self.add_queue(name, id);
            return;
        };
        if old == id {
            return;
        }
        let keys: Vec<BindingKey> = self
            .by_target
            .get(&Target::Queue(old))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        let defs: Vec<BindingDef> = keys
            .iter()
            .filter_map(|k| {
                let args = self.bindings.get(k)?;
                self.binding_def(k, args)
            })
            .collect();
        let mut removed = Removed::default();
        for key in keys {
            self.remove_binding(&key, &mut removed, false);
        }
        self.by_target.remove(&Target::Queue(old));
        self.queue_names.remove(&old);
        self.add_queue(name, id);
        for def in defs {
            // (They resolved a moment ago; the queue's name is unchanged.)
            let _ = self.bind(&def);
        }
    }

    fn resolve(&self, def: &BindingDef) -> Result<BindingKey, ExchangeError> {
        if def.source.is_empty()
            || matches!(&def.destination, Destination::Exchange(d) if d.is_empty())
        {
            return Err(ExchangeError::DefaultExchange);
        }
        let target = match &def.destination {
            Destination::Queue(q) => {
                Target::Queue(self.queue(q).ok_or_else(|| ExchangeError::QueueNotFound {
                    queue: q.to_string(),
                    vhost: self.vhost.to_string(),
                })?)
            }
            Destination::Exchange(x) => Target::Exchange(
                *self
                    .by_name
                    .get(x.as_str())
                    .ok_or_else(|| self.not_found(x))?,
            ),
        };
        let source = *self
            .by_name
            .get(def.source.as_str())
            .ok_or_else(|| self.not_found(&def.source))?;
        Ok(BindingKey {
            source,
            target,
            routing_key: def.routing_key.clone(),
            args: encode_args(&def.arguments),
        })
    }

    /// Adds a binding (`queue.bind`, `exchange.bind`). Binding twice is not an
    /// error; returns whether the binding is new.
    pub fn bind(&mut self, def: &BindingDef) -> Result<bool, ExchangeError> {
        let key = self.resolve(def)?;
        if self.bindings.contains_key(&key) {
            return Ok(false);
        }
        let exchange = self
            .get_mut(key.source)
            .ok_or(ExchangeError::DefaultExchange)?;
        exchange.matcher.validate(&def.arguments)?;
        exchange
            .matcher
            .bind(&def.routing_key, &def.arguments, key.target)?;
        self.by_source
            .entry(key.source)
            .or_default()
            .insert(key.clone());
        self.by_target
            .entry(key.target)
            .or_default()
            .insert(key.clone());
        self.bindings.insert(key, def.arguments.clone());
        Ok(true)
    }

    /// Removes a binding (`queue.unbind`, `exchange.unbind`). Unbinding what
    /// does not exist is not an error (RabbitMQ); binding the default exchange is.
    pub fn unbind(&mut self, def: &BindingDef) -> Result<Removed, ExchangeError> {
        let mut removed = Removed::default();
        match self.resolve(def) {
            Ok(key) => self.remove_binding(&key, &mut removed, true),
            Err(ExchangeError::DefaultExchange) => return Err(ExchangeError::DefaultExchange),
            Err(_) => {}
        }
        Ok(removed)
    }

    /// Removes one binding; with `auto_delete`, deletes its source if that was
    /// its last binding and it is an auto-delete exchange.
    fn remove_binding(&mut self, key: &BindingKey, removed: &mut Removed, auto_delete: bool) {
        let Some(args) = self.bindings.remove(key) else {
            return;
        };
        if let Some(set) = self.by_target.get_mut(&key.target) {
            set.remove(key);
        }
        let mut source_now_unused = false;
        if let Some(set) = self.by_source.get_mut(&key.source) {
            set.remove(key);
            source_now_unused = set.is_empty();
        }
        let def = self.binding_def(key, &args);
        let Some(exchange) = self.get_mut(key.source) else {
            return;
        };
        exchange.matcher.unbind(&key.routing_key, &args, key.target);
        let delete_source = auto_delete && source_now_unused && exchange.def.auto_delete;
        removed.bindings.extend(def);
        if delete_source {
            self.remove_exchange(key.source, removed);
        }
    }

    fn binding_def(&self, key: &BindingKey, args: &FieldTable) -> Option<BindingDef> {
        let source = self.get(key.source)?.def.name.clone();
        let destination = match key.target {
            Target::Queue(id) => Destination::Queue(self.queue_names.get(&id)?.clone()),
            Target::Exchange(x) => Destination::Exchange(self.get(x)?.def.name.clone()),
        };
        Some(BindingDef {
            source,
            destination,
            routing_key: key.routing_key.clone(),
            arguments: args.clone(),
        })
    }

    /// Every binding, by names.
    pub fn bindings(&self) -> impl Iterator<Item = BindingDef> + '_ {
        self.bindings
            .iter()
            .filter_map(|(key, args)| self.binding_def(key, args))
    }

    /// Routes one message published to `exchange` with `routing_key` and the
    /// message's `headers` (needed for headers exchanges and for the `CC`/`BCC`
    /// sender-selected routing keys). The result is in `out`.
    ///
    /// Errors: 404 if `exchange` does not exist, 403 if it is internal.
    pub fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut Routed,
    ) -> Result<(), ExchangeError> {
        self.route_from(exchange, routing_key, headers, out, false)
    }

    /// Routes a dead-lettered message: like [`Router::route`], except that the
    /// dead-letter exchange may be internal (RabbitMQ allows it).
    pub fn route_dead_letter(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut Routed,
    ) -> Result<(), ExchangeError> {
        self.route_from(exchange, routing_key, headers, out, true)
    }

    fn route_from(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut Routed,
        allow_internal: bool,
    ) -> Result<(), ExchangeError> {
        out.queues.clear();
        out.targets.clear();
        out.work.clear();
        out.seen.clear();
        let cc = sender_selected(headers, "CC");
        let bcc = sender_selected(headers, "BCC");
        out.bcc = bcc.is_some();
        let extra_keys = || {
            cc.into_iter()
                .chain(bcc)
                .flatten()
                .filter_map(|v| v.as_str())
        };
        let many_keys = extra_keys().next().is_some();

        // (A dead letter is not a publish: only publishes are counted.)
        let counted = !allow_internal;
        if exchange.is_empty() {
            for key in std::iter::once(routing_key).chain(extra_keys()) {
                if let Some(&id) = self.queues.get(key) {
                    out.queues.push(id);
                }
            }
            if many_keys {
                dedup(&mut out.queues, &mut out.marks);
            }
            if counted {
                self.default_traffic.count(out.queues.len());
            }
            return Ok(());
        }

        let start = *self
            .by_name
            .get(exchange)
            .ok_or_else(|| self.not_found(exchange))?;
        if !allow_internal && self.get(start).is_some_and(|x| x.def.internal) {
            return Err(ExchangeError::Internal {
                exchange: exchange.to_owned(),
                vhost: self.vhost.to_string(),
            });
        }
        let Routed {
            queues,
            targets,
            work,
            seen,
            topic,
            marks,
            ..
        } = out;
        let mut may_duplicate = many_keys;
        work.push(start);
        seen.push(start);
        let mut next = 0;
        while let Some(&idx) = work.get(next) {
            next += 1;
            let Some(x) = self.get(idx) else { continue };
            may_duplicate |= x.matcher.may_duplicate();
            targets.clear();
            if x.matcher.uses_keys() {
                for key in std::iter::once(routing_key).chain(extra_keys()) {
                    x.matcher.route(key, headers, targets, topic);
                }
            } else {
                x.matcher.route(routing_key, headers, targets, topic);
            }
            if targets.is_empty() {
                if let Some(ae) = x
                    .alternate
                    .as_ref()
                    .and_then(|n| self.by_name.get(n.as_str()))
                {
                    if !seen.contains(ae) {
                        seen.push(*ae);
                        work.push(*ae);
                    }
                }
            }
            for t in targets.iter() {
                match *t {
                    Target::Queue(q) => queues.push(q),
                    Target::Exchange(e) => {
                        if !seen.contains(&e) {
                            seen.push(e);
                            work.push(e);
                        }
                    }
                }
            }
        }
        if may_duplicate || seen.len() > 1 {
            dedup(queues, marks);
        }
        if counted {
            if let Some(x) = self.get(start) {
                x.traffic.count(queues.len());
            }
        }
        Ok(())
    }
}

/// One exchange a dry run of routing passed through ([`Router::trace`]):
/// its bindings that match the message and, when none does, the alternate
/// exchange it hands the message to.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteHop {
    /// The exchange.
    pub exchange: ShortStr,
    /// Its bindings that match, each tested alone by the exchange type's
    /// own matcher.
    pub matched: Vec<BindingDef>,
    /// The alternate exchange it passed the message to (no binding matched).
    pub alternate: Option<ShortStr>,
}

/// What routing a message would do, without routing it: each exchange it
/// passes through, in the order routing visits them, and the queues it
/// reaches (each once, by name).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteTrace {
    /// The exchanges passed through.
    pub hops: Vec<RouteHop>,
    /// The queues reached.
    pub queues: Vec<ShortStr>,
}

impl Router {
    /// A dry run of [`Router::route`] that says why: which bindings of
    /// which exchanges match the routing key and headers, and where
    /// alternate exchanges took over. Counts nothing. The same refusals as
    /// routing (no such exchange, an internal one).
    pub fn trace(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
    ) -> Result<RouteTrace, ExchangeError> {
        let mut out = RouteTrace::default();
        if exchange.is_empty() {
            if let Some(name) = self
                .queues
                .get(routing_key)
                .and_then(|id| self.queue_names.get(id))
            {
                out.queues.push(name.clone());
            }
            return Ok(out);
        }
        let start = *self
            .by_name
            .get(exchange)
            .ok_or_else(|| self.not_found(exchange))?;
        if self.get(start).is_some_and(|x| x.def.internal) {
            return Err(ExchangeError::Internal {
                exchange: exchange.to_owned(),
                vhost: self.vhost.to_string(),
            });
        }
        let mut work = vec![start];
        let mut next = 0;
        let mut targets = Vec::new();
        let mut scratch = TopicScratch::default();
        while let Some(&idx) = work.get(next) {
            next += 1;
            let Some(x) = self.get(idx) else { continue };
            let mut hop = RouteHop {
                exchange: x.def.name.clone(),
                matched: Vec::new(),
                alternate: None,
            };
            let mut bindings: Vec<BindingDef> = self
                .by_source
                .get(&idx)
                .into_iter()
                .flatten()
                .filter_map(|key| {
                    let args = self.bindings.get(key)?;
                    // The binding alone, through the type's own matcher.
                    let mut one = Matcher::new(x.def.kind);
                    one.bind(&key.routing_key, args, key.target).ok()?;
                    targets.clear();
                    one.route(routing_key, headers, &mut targets, &mut scratch);
                    if targets.is_empty() {
                        return None;
                    }
                    if let Target::Exchange(e) = key.target {
                        if !work.contains(&e) {
                            work.push(e);
                        }
                    }
                    self.binding_def(key, args)
                })
                .collect();
            bindings.sort_by(|a, b| {
                (a.destination_name(), &a.routing_key).cmp(&(b.destination_name(), &b.routing_key))
            });
            for b in &bindings {
                if let Destination::Queue(q) = &b.destination {
                    if !out.queues.contains(q) {
                        out.queues.push(q.clone());
                    }
                }
            }
            if bindings.is_empty() {
                if let Some(ae) = &x.alternate {
                    if let Some(&ae_idx) = self.by_name.get(ae.as_str()) {
                        if !work.contains(&ae_idx) {
                            work.push(ae_idx);
                        }
                        hop.alternate = Some(ae.clone());
                    }
                }
            }
            hop.matched = bindings;
            out.hops.push(hop);
        }
        Ok(out)
    }
}

/// `CC` / `BCC` header: an array of long strings naming extra routing keys.
fn sender_selected<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a [FieldValue]> {
    match headers?.get(name)? {
        FieldValue::Array(keys) => Some(keys),
        _ => None,
    }
}

/// Removes repeated queues, keeping first occurrences in order.
///
/// Servers hand out small, dense queue ids, so the common case is a pass over
/// a generation-stamped mark array indexed by id (linear; far cheaper than
/// sorting the hundreds of matches a busy topic exchange can produce). Ids
/// beyond [`DENSE_IDS`] fall back to sorting.
fn dedup(queues: &mut Vec<QueueId>, marks: &mut DedupMarks) {
    if queues.len() < 2 {
        return;
    }
    if queues.iter().any(|q| q.0 >= DENSE_IDS) {
        queues.sort_unstable();
        queues.dedup();
        return;
    }
    let epoch = marks.next_epoch();
    queues.retain(|q| {
        let i = q.0 as usize;
        if marks.stamps.len() <= i {
            marks.stamps.resize(i + 1, 0);
        }
        match marks.stamps.get_mut(i) {
            Some(stamp) if *stamp == epoch => false,
            Some(stamp) => {
                *stamp = epoch;
                true
            }
            None => true,
        }
    });
}

/// Queue ids below this are deduplicated with a mark array (4 octets per id).
const DENSE_IDS: u64 = 1 << 22;

#[derive(Debug, Default)]
struct DedupMarks {
    stamps: Vec<u32>,
    epoch: u32,
}

impl DedupMarks {
    fn next_epoch(&mut self) -> u32 {
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.stamps.iter_mut().for_each(|s| *s = 0);
            self.epoch = 1;
        }
        self.epoch
    }
}

/// The fields of `exchange.declare` the router needs.
#[derive(Debug, Clone, Copy)]
pub struct ExchangeDeclare<'a> {
    /// Exchange name.
    pub name: &'a str,
    /// Type as the client sent it.
    pub kind: &'a str,
    /// Durable flag.
    pub durable: bool,
    /// Auto-delete flag.
    pub auto_delete: bool,
    /// Internal flag.
    pub internal: bool,
    /// Arguments.
    pub arguments: &'a FieldTable,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> ShortStr {
        ShortStr::try_from(v).unwrap()
    }

    fn declare(
        r: &mut Router,
        name: &str,
        kind: &str,
        args: &FieldTable,
    ) -> Result<bool, ExchangeError> {
        r.declare_exchange(
            ExchangeDeclare {
                name,
                kind,
                durable: false,
                auto_delete: false,
                internal: false,
                arguments: args,
            },
            false,
        )
    }

    fn qbind(source: &str, queue: &str, key: &str) -> BindingDef {
        BindingDef {
            source: s(source),
            destination: Destination::Queue(s(queue)),
            routing_key: s(key),
            arguments: FieldTable::new(),
        }
    }

    fn xbind(source: &str, dest: &str, key: &str) -> BindingDef {
        BindingDef {
            source: s(source),
            destination: Destination::Exchange(s(dest)),
            routing_key: s(key),
            arguments: FieldTable::new(),
        }
    }

    fn route(r: &Router, x: &str, key: &str) -> Vec<u64> {
        let mut out = Routed::default();
        r.route(x, key, None, &mut out).unwrap();
        let mut queues: Vec<u64> = out.queues().iter().map(|q| q.0).collect();
        queues.sort_unstable();
        queues
    }

    fn declare_auto_delete_fanout(r: &mut Router, name: &str) {
        r.declare_exchange(
            ExchangeDeclare {
                name,
                kind: "fanout",
                durable: false,
                auto_delete: true,
                internal: false,
                arguments: &FieldTable::new(),
            },
            false,
        )
        .unwrap();
    }

    fn router_with_queues(n: u64) -> Router {
        let mut r = Router::new(s("/"));
        for i in 0..n {
            r.add_queue(s(&format!("q{i}")), QueueId(i));
        }
        r
    }

    fn ae_args(ae: &str) -> FieldTable {
        [(s("alternate-exchange"), FieldValue::from(ae))]
            .into_iter()
            .collect()
    }

    #[test]
    fn default_exchange_routes_by_queue_name_and_refuses_binding() {
        let mut r = router_with_queues(2);
        assert_eq!(route(&r, "", "q1"), [1]);
        assert!(route(&r, "", "nope").is_empty());
        assert_eq!(
            r.bind(&qbind("", "q1", "k")),
            Err(ExchangeError::DefaultExchange)
        );
        assert_eq!(
            r.unbind(&qbind("", "q1", "k")),
            Err(ExchangeError::DefaultExchange)
        );
        assert_eq!(
            r.delete_exchange("", false),
            Err(ExchangeError::DefaultExchange)
        );
        assert_eq!(
            declare(&mut r, "", "direct", &FieldTable::new()),
            Err(ExchangeError::DefaultExchange)
        );
    }

    /// `publish_in` counts publishes to the exchange itself (not to those
    /// it forwards to, nor dead letters), `publish_out` the queue copies.
    #[test]
    fn exchanges_count_what_they_took_and_the_copies_they_made() {
        let mut r = router_with_queues(3);
        declare(&mut r, "fan", "fanout", &FieldTable::new()).unwrap();
        declare(&mut r, "inner", "fanout", &FieldTable::new()).unwrap();
        r.bind(&qbind("fan", "q0", "")).unwrap();
        r.bind(&xbind("fan", "inner", "")).unwrap();
        r.bind(&qbind("inner", "q1", "")).unwrap();
        r.bind(&qbind("inner", "q2", "")).unwrap();
        assert_eq!(route(&r, "fan", "k"), [0, 1, 2]);
        assert_eq!(route(&r, "", "q1"), [1]);
        assert!(route(&r, "", "nope").is_empty());
        let mut out = Routed::default();
        r.route_dead_letter("fan", "k", None, &mut out).unwrap();
        assert_eq!(r.traffic("fan"), Some([1, 3]));
        assert_eq!(r.traffic("inner"), Some([0, 0]));
        assert_eq!(r.traffic(""), Some([2, 1]));
        assert_eq!(r.traffic("missing"), None);
        let all: Vec<(&str, [u64; 2])> = r.all_traffic().filter(|(_, t)| *t != [0, 0]).collect();
        assert_eq!(all, [("", [2, 1]), ("fan", [1, 3])]);
    }

    /// The dry run names the bindings that match, hop by hop, reaches the
    /// same queues as routing, and says where an alternate exchange took
    /// over; it counts nothing.
    #[test]
    fn a_trace_says_which_bindings_match_and_reaches_what_routing_reaches() {
        let mut r = router_with_queues(4);
        declare(&mut r, "orders", "topic", &ae_args("lost")).unwrap();
        declare(&mut r, "lost", "fanout", &FieldTable::new()).unwrap();
        declare(&mut r, "audit", "fanout", &FieldTable::new()).unwrap();
        r.bind(&qbind("orders", "q0", "order.*.eu")).unwrap();
        r.bind(&qbind("orders", "q1", "order.#")).unwrap();
        r.bind(&qbind("orders", "q1", "invoice.#")).unwrap();
        r.bind(&xbind("orders", "audit", "#")).unwrap();
        r.bind(&qbind("audit", "q2", "")).unwrap();
        r.bind(&qbind("lost", "q3", "")).unwrap();
        for key in ["order.new.eu", "order.new.us", "nothing"] {
            let t = r.trace("orders", key, None).unwrap();
            let mut names: Vec<u64> = t
                .queues
                .iter()
                .map(|n| r.queue(n.as_str()).unwrap().0)
                .collect();
            names.sort_unstable();
            assert_eq!(names, route(&r, "orders", key), "{key}");
        }
        // (Only the routing above was counted.)
        let counted = r.traffic("orders");
        let t = r.trace("orders", "order.new.eu", None).unwrap();
        let first = &t.hops[0];
        assert_eq!(first.exchange.as_str(), "orders");
        let keys: Vec<&str> = first
            .matched
            .iter()
            .map(|b| b.routing_key.as_str())
            .collect();
        assert_eq!(keys, ["#", "order.*.eu", "order.#"]);
        assert_eq!(t.hops[1].exchange.as_str(), "audit");
        assert!(first.alternate.is_none());
        // Only the audit binding ("#") matches "nothing"; the alternate
        // exchange takes over only when nothing matches at all.
        let t = r.trace("orders", "nothing", None).unwrap();
        assert_eq!(t.hops[0].matched.len(), 1);
        r.unbind(&xbind("orders", "audit", "#")).unwrap();
        let t = r.trace("orders", "nothing", None).unwrap();
        assert!(t.hops[0].matched.is_empty());
        assert_eq!(
            t.hops[0].alternate.as_ref().map(ShortStr::as_str),
            Some("lost")
        );
        assert_eq!(t.queues, [s("q3")]);
        assert_eq!(r.traffic("orders"), counted);
        assert!(r.trace("missing", "k", None).is_err());
        assert_eq!(r.trace("", "q2", None).unwrap().queues, [s("q2")]);
    }

    #[test]
    fn system_exchanges_exist_and_are_protected() {
        let mut r = router_with_queues(1);
        for (name, _, internal) in SYSTEM_EXCHANGES {
            assert_eq!(
                r.exchange(name).map(|x| x.internal),
                Some(internal),
                "{name}"
            );
        }
        let e = r.delete_exchange("amq.direct", false).unwrap_err();
        assert_eq!(e.reply_code(), 403);
        assert_eq!(
            e.to_string(),
            "deletion of system exchange 'amq.direct' in vhost '/' not allowed"
        );
        let e = declare(&mut r, "amq.foo", "direct", &FieldTable::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "exchange name 'amq.foo' contains reserved prefix 'amq.*'"
        );
        // Redeclaring a system exchange with its own properties is fine (it is durable).
        let ok = r.declare_exchange(
            ExchangeDeclare {
                name: "amq.direct",
                kind: "direct",
                durable: true,
                auto_delete: false,
                internal: false,
                arguments: &FieldTable::new(),
            },
            false,
        );
        assert_eq!(ok, Ok(false));
        assert!(declare(&mut r, "AMQ.foo", "direct", &FieldTable::new()).unwrap());
    }

    #[test]
    fn declare_checks_type_and_equivalence() {
        let mut r = router_with_queues(0);
        assert_eq!(
            declare(&mut r, "x", "x-foo", &FieldTable::new()),
            Err(ExchangeError::UnknownType("x-foo".into()))
        );
        assert!(ExchangeError::EmptyType.is_connection_error());
        assert!(declare(&mut r, "x", "direct", &FieldTable::new()).unwrap());
        assert!(!declare(&mut r, "x", "direct", &FieldTable::new()).unwrap());
        let e = declare(&mut r, "x", "topic", &FieldTable::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "inequivalent arg 'type' for exchange 'x' in vhost '/': received 'topic' but current is 'direct'"
        );
        let e = declare(&mut r, "x", "direct", &ae_args("ae")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "inequivalent arg 'alternate-exchange' for exchange 'x' in vhost '/': received the value 'ae' of type 'longstr' but current is none"
        );
        let e = r
            .declare_exchange(
                ExchangeDeclare {
                    name: "x",
                    kind: "direct",
                    durable: true,
                    auto_delete: false,
                    internal: false,
                    arguments: &FieldTable::new(),
                },
                false,
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "inequivalent arg 'durable' for exchange 'x' in vhost '/': received 'true' but current is 'false'"
        );
        // Passive: existence only.
        assert_eq!(
            r.declare_exchange(
                ExchangeDeclare {
                    name: "x",
                    kind: "topic",
                    durable: true,
                    auto_delete: true,
                    internal: true,
                    arguments: &FieldTable::new()
                },
                true
            ),
            Ok(false)
        );
        let e = r
            .declare_exchange(
                ExchangeDeclare {
                    name: "nope",
                    kind: "x-foo",
                    durable: false,
                    auto_delete: false,
                    internal: false,
                    arguments: &FieldTable::new(),
                },
                true,
            )
            .unwrap_err();
        assert_eq!(e.to_string(), "no exchange 'nope' in vhost '/'");
        let bad_ae: FieldTable = [(s("alternate-exchange"), FieldValue::I32(5))]
            .into_iter()
            .collect();
        let e = declare(&mut r, "y", "direct", &bad_ae).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid type 'signedint' for arg 'alternate-exchange' in exchange 'y' in vhost '/'"
        );
    }

    #[test]
    fn bind_is_idempotent_and_unbind_of_nothing_is_fine() {
        let mut r = router_with_queues(2);
        assert_eq!(r.bind(&qbind("amq.direct", "q0", "k")), Ok(true));
        assert_eq!(r.bind(&qbind("amq.direct", "q0", "k")), Ok(false));
        assert_eq!(route(&r, "amq.direct", "k"), [0]);
        assert_eq!(
            r.unbind(&qbind("amq.direct", "q1", "k")),
            Ok(Removed::default())
        );
        assert_eq!(r.unbind(&qbind("nope", "q1", "k")), Ok(Removed::default()));
        assert_eq!(
            r.unbind(&qbind("amq.direct", "nope", "k")),
            Ok(Removed::default())
        );
        assert_eq!(
            r.unbind(&qbind("amq.direct", "q0", "k"))
                .unwrap()
                .bindings
                .len(),
            1
        );
        assert!(route(&r, "amq.direct", "k").is_empty());
        assert_eq!(
            r.bind(&qbind("amq.direct", "nope", "k"))
                .unwrap_err()
                .to_string(),
            "no queue 'nope' in vhost '/'"
        );
        assert_eq!(
            r.bind(&qbind("nope", "q0", "k")).unwrap_err().to_string(),
            "no exchange 'nope' in vhost '/'"
        );
    }

    #[test]
    fn missing_and_internal_exchanges_refuse_publishes() {
        let mut r = router_with_queues(1);
        let mut out = Routed::default();
        assert_eq!(
            r.route("nope", "k", None, &mut out)
                .unwrap_err()
                .reply_code(),
            404
        );
        r.declare_exchange(
            ExchangeDeclare {
                name: "in",
                kind: "fanout",
                durable: false,
                auto_delete: false,
                internal: true,
                arguments: &FieldTable::new(),
            },
            false,
        )
        .unwrap();
        let e = r.route("in", "k", None, &mut out).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot publish to internal exchange 'in' in vhost '/'"
        );
        // ...but messages reach it through an e2e binding.
        r.bind(&qbind("in", "q0", "")).unwrap();
        r.bind(&xbind("amq.fanout", "in", "")).unwrap();
        assert_eq!(route(&r, "amq.fanout", "any"), [0]);
    }

    #[test]
    fn e2e_chains_deliver_once_and_cycles_terminate() {
        let mut r = router_with_queues(3);
        for x in ["a", "b", "c"] {
            declare(&mut r, x, "fanout", &FieldTable::new()).unwrap();
        }
        r.bind(&xbind("a", "b", "")).unwrap();
        r.bind(&xbind("b", "c", "")).unwrap();
        r.bind(&xbind("c", "a", "")).unwrap(); // cycle
        r.bind(&qbind("a", "q0", "")).unwrap();
        r.bind(&qbind("b", "q0", "")).unwrap(); // second path to q0
        r.bind(&qbind("c", "q2", "")).unwrap();
        assert_eq!(route(&r, "a", ""), [0, 2]);
        assert_eq!(route(&r, "c", ""), [0, 2]);
    }

    #[test]
    fn alternate_exchange_takes_unroutable_messages() {
        let mut r = router_with_queues(2);
        declare(&mut r, "main", "direct", &ae_args("ae")).unwrap();
        declare(&mut r, "ae", "fanout", &ae_args("main")).unwrap(); // AE cycle
        r.bind(&qbind("main", "q0", "known")).unwrap();
        assert_eq!(route(&r, "main", "known"), [0]);
        assert!(
            route(&r, "main", "other").is_empty(),
            "the AE routes nowhere either"
        );
        r.bind(&qbind("ae", "q1", "")).unwrap();
        assert_eq!(route(&r, "main", "other"), [1]);
        assert_eq!(
            route(&r, "main", "known"),
            [0],
            "routed messages skip the AE"
        );
        // A missing AE is ignored.
        declare(&mut r, "lonely", "direct", &ae_args("missing")).unwrap();
        assert!(route(&r, "lonely", "x").is_empty());
    }

    #[test]
    fn cc_and_bcc_add_routing_keys() {
        let mut r = router_with_queues(3);
        for (q, k) in [("q0", "a"), ("q1", "b"), ("q2", "c")] {
            r.bind(&qbind("amq.direct", q, k)).unwrap();
        }
        let headers: FieldTable = [
            (
                s("CC"),
                FieldValue::Array(vec![FieldValue::from("b"), FieldValue::from("a")]),
            ),
            (s("BCC"), FieldValue::Array(vec![FieldValue::from("c")])),
        ]
        .into_iter()
        .collect();
        let mut out = Routed::default();
        r.route("amq.direct", "a", Some(&headers), &mut out)
            .unwrap();
        assert_eq!(out.queues(), [QueueId(0), QueueId(1), QueueId(2)]);
        assert!(out.has_bcc());
        r.route("", "q0", Some(&headers), &mut out).unwrap();
        assert_eq!(
            out.queues(),
            [QueueId(0)],
            "default exchange: only q0 is named"
        );
        r.route("amq.direct", "a", None, &mut out).unwrap();
        assert!(!out.has_bcc());
    }

    #[test]
    fn auto_delete_exchange_goes_with_its_last_binding() {
        let mut r = router_with_queues(2);
        declare_auto_delete_fanout(&mut r, "ad");
        r.bind(&qbind("ad", "q0", "")).unwrap();
        r.bind(&qbind("ad", "q1", "")).unwrap();
        assert!(
            r.unbind(&qbind("ad", "q0", ""))
                .unwrap()
                .exchanges
                .is_empty()
        );
        let removed = r.remove_queue(QueueId(1));
        assert_eq!(removed.exchanges.len(), 1);
        assert_eq!(removed.bindings.len(), 1);
        assert!(r.exchange("ad").is_none());
        assert!(
            route(&r, "", "q1").is_empty(),
            "queue forgotten by the default exchange"
        );
    }

    #[test]
    fn a_queue_given_a_new_id_keeps_its_bindings_and_their_exchanges() {
        let mut r = router_with_queues(2);
        declare_auto_delete_fanout(&mut r, "ad");
        r.bind(&qbind("ad", "q1", "")).unwrap();
        r.bind(&qbind("amq.direct", "q1", "k")).unwrap();
        r.bind(&qbind("amq.direct", "q0", "k")).unwrap();
        r.replace_queue(s("q1"), QueueId(9));
        assert!(r.exchange("ad").is_some(), "its only binding moved with it");
        assert_eq!(route(&r, "ad", ""), [9]);
        assert_eq!(route(&r, "amq.direct", "k"), [0, 9]);
        assert_eq!(route(&r, "", "q1"), [9]);
        assert_eq!(r.queue("q1"), Some(QueueId(9)));
        assert_eq!(r.bindings().count(), 3);
        // A queue it did not know is added.
        r.replace_queue(s("new"), QueueId(10));
        assert_eq!(route(&r, "", "new"), [10]);
    }

    #[test]
    fn deleting_an_exchange_removes_bindings_both_ways() {
        let mut r = router_with_queues(1);
        declare(&mut r, "mid", "fanout", &FieldTable::new()).unwrap();
        r.bind(&xbind("amq.fanout", "mid", "")).unwrap();
        r.bind(&qbind("mid", "q0", "")).unwrap();
        assert_eq!(route(&r, "amq.fanout", ""), [0]);
        assert_eq!(
            r.delete_exchange("mid", true).unwrap_err().reply_code(),
            406
        );
        let removed = r.delete_exchange("mid", false).unwrap();
        assert_eq!(removed.bindings.len(), 2);
        assert_eq!(removed.exchanges.len(), 1);
        assert!(route(&r, "amq.fanout", "").is_empty());
        assert_eq!(r.bindings().count(), 0);
        assert_eq!(r.delete_exchange("mid", false), Ok(Removed::default()));
        // Only being a destination does not make an exchange "in use".
        declare(&mut r, "dst", "fanout", &FieldTable::new()).unwrap();
        r.bind(&xbind("amq.fanout", "dst", "")).unwrap();
        assert!(r.delete_exchange("dst", true).is_ok());
    }
}
