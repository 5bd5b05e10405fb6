//! [`MetaCommand`]: every change to the broker's metadata (vhosts, users,
//! permissions, topic permissions, policies, vhost limits, durable
//! exchanges, queues and bindings) as one value, and the one encoding of
//! each definition as the store keeps it.
//!
//! A stored definition is the record of the command that creates it, so
//! recovery turns each stored definition back into that command
//! ([`MetaCommand::from_definition`]) and applies it like any other: there is
//! no second parser. The replicated metadata log will carry these commands
//! as they are.

use amqp_codec::{FieldTable, FieldValue, ShortStr};
use bytes::{BufMut, Bytes, BytesMut};
use exchange::{BindingDef, Destination, ExchangeDef, ExchangeKind};
use queue_store::{DefKind, scoped_name};

use regex::Regex;

use crate::policy::{Policy, PolicyKind};

/// A user.
#[derive(Debug, Clone)]
pub struct User {
    /// Name.
    pub name: String,
    /// RabbitMQ-format SHA-256 hash; `None` means the user cannot log in with a password.
    pub password_hash: Option<String>,
    /// Tags (`administrator`, `monitoring`, `management`, `policymaker`, `impersonator`).
    pub tags: Vec<String>,
}

/// Compiles a permission pattern. As in RabbitMQ, patterns match anywhere in
/// the name (use `^...$` to anchor), and the empty pattern is a synonym for
/// `^$`: it matches no name at all.
pub fn compile_pattern(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(if pattern.is_empty() { "^$" } else { pattern })
}

/// Per-vhost limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VhostLimits {
    /// Most connections to the vhost at once.
    pub max_connections: Option<usize>,
    /// Most queues in the vhost.
    pub max_queues: Option<usize>,
}

impl VhostLimits {
    /// RabbitMQ's name of the connection limit.
    pub const CONNECTIONS: &'static str = "max-connections";
    /// RabbitMQ's name of the queue limit.
    pub const QUEUES: &'static str = "max-queues";

    fn record(&self) -> FieldTable {
        let mut t = FieldTable::new();
        if let Some(n) = self.max_connections {
            t.insert(s(Self::CONNECTIONS), FieldValue::I64(n as i64));
        }
        if let Some(n) = self.max_queues {
            t.insert(s(Self::QUEUES), FieldValue::I64(n as i64));
        }
        t
    }

    fn from_record(t: &FieldTable) -> VhostLimits {
        let get = |k: &str| {
            t.get(k)
                .and_then(FieldValue::as_i64)
                .and_then(|n| usize::try_from(n).ok())
        };
        VhostLimits {
            max_connections: get(Self::CONNECTIONS),
            max_queues: get(Self::QUEUES),
        }
    }
}

/// A user's permissions in one vhost, as given (regular expressions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionDef {
    /// User.
    pub user: String,
    /// Vhost.
    pub vhost: String,
    /// Pattern for declare/delete.
    pub configure: String,
    /// Pattern for publish/bind-to.
    pub write: String,
    /// Pattern for consume/get/purge/bind-from.
    pub read: String,
}

/// A user's topic permissions on one exchange in one vhost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPermissionDef {
    /// User.
    pub user: String,
    /// Vhost.
    pub vhost: String,
    /// Exchange.
    pub exchange: String,
    /// Pattern routing keys must match to publish.
    pub write: String,
    /// Pattern binding keys must match to bind for consuming.
    pub read: String,
}

/// A queue as its definition records it: a durable one (stored), or in a
/// cluster a transient one too (in the metadata log only, so that every
/// node can route to it).
#[derive(Debug, Clone, PartialEq)]
pub struct QueueDef {
    /// Name.
    pub name: ShortStr,
    /// The store's id for its messages.
    pub id: u64,
    /// Survives a restart of its home node (only durable queues are stored).
    pub durable: bool,
    /// Owned by one connection on its home node; gone when its home node
    /// restarts.
    pub exclusive: bool,
    /// Deleted with its last consumer.
    pub auto_delete: bool,
    /// Declare arguments as given.
    pub arguments: FieldTable,
    /// The node it lives on, in a cluster (`None`: this node, alone); for a
    /// replicated queue, the member that started its group.
    pub home: Option<String>,
    /// A replicated (quorum) queue's members: the nodes holding its
    /// replicas (empty for any other queue).
    pub members: Vec<String>,
    /// For a replicated queue that took over a durable classic queue of
    /// the same name when a mirroring policy (`ha-mode`) came to match it:
    /// that queue's id. Its home moves its messages into the group (the
    /// vhost's `mirroring` module), after a restart too.
    pub replaces: Option<u64>,
}

/// One change to the metadata.
#[derive(Debug, Clone)]
pub enum MetaCommand {
    /// Creates a vhost, or changes its limits.
    PutVhost {
        /// Name.
        name: String,
        /// Its limits.
        limits: VhostLimits,
    },
    /// Deletes a vhost and everything in it (permissions and policies too).
    DeleteVhost {
        /// Name.
        name: String,
    },
    /// Creates or replaces a user.
    PutUser(User),
    /// Deletes a user and their permissions.
    DeleteUser {
        /// Name.
        name: String,
    },
    /// Sets a user's permissions in a vhost.
    SetPermission(PermissionDef),
    /// Clears a user's permissions in a vhost.
    ClearPermission {
        /// User.
        user: String,
        /// Vhost.
        vhost: String,
    },
    /// Sets a user's topic permissions on an exchange.
    SetTopicPermission(TopicPermissionDef),
    /// Clears a user's topic permissions on an exchange.
    ClearTopicPermission {
        /// User.
        user: String,
        /// Vhost.
        vhost: String,
        /// Exchange.
        exchange: String,
    },
    /// Adds or replaces a policy or an operator policy (its `kind`).
    PutPolicy(Policy),
    /// Removes a policy or an operator policy.
    DeletePolicy {
        /// Vhost.
        vhost: String,
        /// Name.
        name: String,
        /// Which of the two.
        kind: PolicyKind,
    },
    /// Declares a durable exchange (or, in a cluster, a transient one).
    DeclareExchange {
        /// Vhost.
        vhost: String,
        /// The exchange.
        exchange: ExchangeDef,
    },
    /// Deletes a durable exchange and the bindings naming it.
    DeleteExchange {
        /// Vhost.
        vhost: String,
        /// Name.
        name: ShortStr,
    },
    /// Declares a durable queue (or, in a cluster, a transient one).
    DeclareQueue {
        /// Vhost.
        vhost: String,
        /// The queue.
        queue: QueueDef,
    },
    /// Deletes a durable queue and the bindings to it.
    DeleteQueue {
        /// Vhost.
        vhost: String,
        /// Name.
        name: ShortStr,
    },
    /// Removes every transient (or exclusive) queue homed on `home`
    /// whose id was issued before `before` (the first id of the node's
    /// current run), with the bindings to them: a node that restarted
    /// commits it, since those queues died with its previous run (a
    /// cluster only).
    DropTransient {
        /// The node that restarted.
        home: String,
        /// The lowest queue id (its counter part) of the node's new run.
        before: u64,
    },
    /// Adds a binding (between durable ends on a node alone; any binding
    /// in a cluster, whose routers all follow the log).
    Bind {
        /// Vhost.
        vhost: String,
        /// The binding.
        binding: BindingDef,
    },
    /// Removes a binding.
    Unbind {
        /// Vhost.
        vhost: String,
        /// The binding.
        binding: BindingDef,
    },
}

/// A definition as stored: its kind, key and record.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    /// What it defines.
    pub kind: DefKind,
    /// Its key ([`scoped_name`] for objects inside a vhost).
    pub key: Bytes,
    /// Its record.
    pub record: FieldTable,
}

fn s(v: &'static str) -> ShortStr {
    ShortStr::from_static(v)
}

fn text(t: &FieldTable, k: &str) -> Result<String, String> {
    t.get(k)
        .and_then(FieldValue::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("no text field '{k}'"))
}

fn short(t: &FieldTable, k: &str) -> Result<ShortStr, String> {
    ShortStr::try_from(text(t, k)?.as_str()).map_err(|e| format!("field '{k}': {e}"))
}

fn flag(t: &FieldTable, k: &str) -> bool {
    matches!(t.get(k), Some(FieldValue::Bool(true)))
}

fn table(t: &FieldTable, k: &str) -> FieldTable {
    match t.get(k) {
        Some(FieldValue::Table(v)) => v.clone(),
        _ => FieldTable::new(),
    }
}

fn record<const N: usize>(fields: [(&'static str, FieldValue); N]) -> FieldTable {
    fields.into_iter().map(|(k, v)| (s(k), v)).collect()
}

/// The key of a binding's definition: its vhost, source, destination,
/// routing key and encoded arguments.
pub fn binding_key(vhost: &str, b: &BindingDef) -> Bytes {
    let (kind, dest) = match &b.destination {
        Destination::Queue(q) => (&b"q"[..], q),
        Destination::Exchange(x) => (&b"e"[..], x),
    };
    let mut args = BytesMut::new();
    if b.arguments.encode(&mut args).is_err() {
        args.clear();
    }
    let mut rk = BytesMut::new();
    rk.put_slice(b.routing_key.as_bytes());
    scoped_name(
        vhost,
        &[b.source.as_bytes(), kind, dest.as_bytes(), &rk, &args],
    )
}

/// Where a policy of `kind` is stored (the two kinds' names are apart).
pub fn policy_def_kind(kind: PolicyKind) -> DefKind {
    match kind {
        PolicyKind::User => DefKind::Policy,
        PolicyKind::Operator => DefKind::OperatorPolicy,
    }
}

fn user_record(u: &User) -> FieldTable {
    let mut t = FieldTable::new();
    t.insert(s("name"), FieldValue::from(u.name.as_str()));
    if let Some(h) = &u.password_hash {
        t.insert(s("password_hash"), FieldValue::from(h.as_str()));
    }
    t.insert(s("tags"), FieldValue::from(u.tags.join(",").as_str()));
    t
}

fn exchange_record(x: &ExchangeDef) -> FieldTable {
    record([
        ("name", FieldValue::from(x.name.as_str())),
        ("type", FieldValue::from(x.kind.as_str())),
        ("durable", FieldValue::Bool(x.durable)),
        ("auto_delete", FieldValue::Bool(x.auto_delete)),
        ("internal", FieldValue::Bool(x.internal)),
        ("arguments", FieldValue::Table(x.arguments.clone())),
    ])
}

fn binding_record(b: &BindingDef) -> FieldTable {
    let (kind, dest) = match &b.destination {
        Destination::Queue(q) => ("queue", q),
        Destination::Exchange(x) => ("exchange", x),
    };
    record([
        ("source", FieldValue::from(b.source.as_str())),
        ("destination", FieldValue::from(dest.as_str())),
        ("destination_type", FieldValue::from(kind)),
        ("routing_key", FieldValue::from(b.routing_key.as_str())),
        ("arguments", FieldValue::Table(b.arguments.clone())),
    ])
}

fn name_key(name: &str) -> Bytes {
    Bytes::copy_from_slice(name.as_bytes())
}

impl MetaCommand {
    /// The definition this command puts, if it puts one (the deleting
    /// commands and their cascades are worked out by `MetaState`).
    pub fn definition(&self) -> Option<Definition> {
        let (kind, key, record) = match self {
            MetaCommand::PutVhost { name, limits } => {
                (DefKind::Vhost, name_key(name), limits.record())
            }
            MetaCommand::PutUser(u) => (DefKind::User, name_key(&u.name), user_record(u)),
            MetaCommand::SetPermission(p) => (
                DefKind::Permission,
                scoped_name(&p.vhost, &[p.user.as_bytes()]),
                record([
                    ("user", FieldValue::from(p.user.as_str())),
                    ("vhost", FieldValue::from(p.vhost.as_str())),
                    ("configure", FieldValue::from(p.configure.as_str())),
                    ("write", FieldValue::from(p.write.as_str())),
                    ("read", FieldValue::from(p.read.as_str())),
                ]),
            ),
            MetaCommand::SetTopicPermission(p) => (
                DefKind::TopicPermission,
                scoped_name(&p.vhost, &[p.user.as_bytes(), p.exchange.as_bytes()]),
                record([
                    ("user", FieldValue::from(p.user.as_str())),
                    ("vhost", FieldValue::from(p.vhost.as_str())),
                    ("exchange", FieldValue::from(p.exchange.as_str())),
                    ("write", FieldValue::from(p.write.as_str())),
                    ("read", FieldValue::from(p.read.as_str())),
                ]),
            ),
            MetaCommand::PutPolicy(p) => (
                policy_def_kind(p.kind),
                scoped_name(&p.vhost, &[p.name.as_bytes()]),
                p.record(),
            ),
            MetaCommand::DeclareExchange { vhost, exchange } => (
                DefKind::Exchange,
                scoped_name(vhost, &[exchange.name.as_bytes()]),
                exchange_record(exchange),
            ),
            MetaCommand::DeclareQueue { vhost, queue } => (
                DefKind::Queue,
                scoped_name(vhost, &[queue.name.as_bytes()]),
                {
                    let mut r = record([
                        ("name", FieldValue::from(queue.name.as_str())),
                        ("id", FieldValue::I64(queue.id as i64)),
                        ("auto_delete", FieldValue::Bool(queue.auto_delete)),
                        ("arguments", FieldValue::Table(queue.arguments.clone())),
                    ]);
                    if let Some(home) = &queue.home {
                        r.insert(s("node"), FieldValue::from(home.as_str()));
                    }
                    if !queue.members.is_empty() {
                        r.insert(
                            s("members"),
                            FieldValue::Array(
                                queue
                                    .members
                                    .iter()
                                    .map(|m| FieldValue::from(m.as_str()))
                                    .collect(),
                            ),
                        );
                    }
                    // Written only when they differ from a stored queue's
                    // (durable, not exclusive), so stored records keep
                    // their form.
                    if !queue.durable {
                        r.insert(s("durable"), FieldValue::Bool(false));
                    }
                    if queue.exclusive {
                        r.insert(s("exclusive"), FieldValue::Bool(true));
                    }
                    if let Some(old) = queue.replaces {
                        r.insert(s("replaces"), FieldValue::I64(old as i64));
                    }
                    r
                },
            ),
            MetaCommand::Bind { vhost, binding } => (
                DefKind::Binding,
                binding_key(vhost, binding),
                binding_record(binding),
            ),
            _ => return None,
        };
        Some(Definition { kind, key, record })
    }

    /// The command that recreates a stored definition (at boot). An error
    /// says what the record lacks.
    pub fn from_definition(
        kind: DefKind,
        key: &[u8],
        t: &FieldTable,
    ) -> Result<MetaCommand, String> {
        // Objects inside a vhost are keyed `vhost ‖ 0 ‖ ...`.
        let vhost = || -> Result<String, String> {
            let end = key
                .iter()
                .position(|&b| b == 0)
                .ok_or("key names no vhost")?;
            String::from_utf8(key[..end].to_vec()).map_err(|e| e.to_string())
        };
        Ok(match kind {
            DefKind::Vhost => MetaCommand::PutVhost {
                name: String::from_utf8(key.to_vec()).map_err(|e| e.to_string())?,
                limits: VhostLimits::from_record(t),
            },
            DefKind::User => MetaCommand::PutUser(User {
                name: text(t, "name")?,
                password_hash: text(t, "password_hash").ok(),
                tags: text(t, "tags")
                    .unwrap_or_default()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            }),
            DefKind::Permission => MetaCommand::SetPermission(PermissionDef {
                user: text(t, "user")?,
                vhost: text(t, "vhost")?,
                configure: text(t, "configure")?,
                write: text(t, "write")?,
                read: text(t, "read")?,
            }),
            DefKind::TopicPermission => MetaCommand::SetTopicPermission(TopicPermissionDef {
                user: text(t, "user")?,
                vhost: text(t, "vhost")?,
                exchange: text(t, "exchange")?,
                write: text(t, "write")?,
                read: text(t, "read")?,
            }),
            DefKind::Policy => MetaCommand::PutPolicy(
                Policy::from_record(t, PolicyKind::User).ok_or("not a valid policy record")?,
            ),
            DefKind::OperatorPolicy => MetaCommand::PutPolicy(
                Policy::from_record(t, PolicyKind::Operator)
                    .ok_or("not a valid operator policy record")?,
            ),
            DefKind::Exchange => {
                let kind = text(t, "type")?;
                MetaCommand::DeclareExchange {
                    vhost: vhost()?,
                    exchange: ExchangeDef {
                        name: short(t, "name")?,
                        kind: ExchangeKind::parse(&kind).map_err(|e| e.to_string())?,
                        // Stored records are durable; a cluster's log also
                        // carries transient ones.
                        durable: !matches!(t.get("durable"), Some(FieldValue::Bool(false))),
                        auto_delete: flag(t, "auto_delete"),
                        internal: flag(t, "internal"),
                        arguments: table(t, "arguments"),
                    },
                }
            }
            DefKind::Queue => {
                let Some(FieldValue::I64(id)) = t.get("id") else {
                    return Err("no queue id".into());
                };
                MetaCommand::DeclareQueue {
                    vhost: vhost()?,
                    queue: QueueDef {
                        name: short(t, "name")?,
                        id: u64::try_from(*id).map_err(|e| e.to_string())?,
                        durable: !matches!(t.get("durable"), Some(FieldValue::Bool(false))),
                        exclusive: flag(t, "exclusive"),
                        auto_delete: flag(t, "auto_delete"),
                        arguments: table(t, "arguments"),
                        home: text(t, "node").ok(),
                        members: match t.get("members") {
                            Some(FieldValue::Array(a)) => a
                                .iter()
                                .filter_map(FieldValue::as_str)
                                .map(str::to_owned)
                                .collect(),
                            _ => Vec::new(),
                        },
                        replaces: match t.get("replaces") {
                            Some(FieldValue::I64(old)) => u64::try_from(*old).ok(),
                            _ => None,
                        },
                    },
                }
            }
            DefKind::Binding => {
                let dest = short(t, "destination")?;
                let destination = match text(t, "destination_type")?.as_str() {
                    "exchange" => Destination::Exchange(dest),
                    "queue" => Destination::Queue(dest),
                    other => return Err(format!("destination type '{other}'")),
                };
                MetaCommand::Bind {
                    vhost: vhost()?,
                    binding: BindingDef {
                        source: short(t, "source")?,
                        destination,
                        routing_key: short(t, "routing_key")?,
                        arguments: table(t, "arguments"),
                    },
                }
            }
        })
    }

    /// The command as it travels between nodes (a cluster's metadata log):
    /// a field table with an `op` and, for a put, the definition it puts
    /// (kind, key, record); for a delete, what it names.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut t = FieldTable::new();
        let mut put = |k: &'static str, v: FieldValue| t.insert(s(k), v);
        if let Some(d) = self.definition() {
            put("op", FieldValue::from("put"));
            put("kind", FieldValue::U8(d.kind as u8));
            put("key", FieldValue::ByteArray(d.key));
            put("record", FieldValue::Table(d.record));
        } else {
            match self {
                MetaCommand::DeleteVhost { name } | MetaCommand::DeleteUser { name } => {
                    let op = if matches!(self, MetaCommand::DeleteVhost { .. }) {
                        "delete_vhost"
                    } else {
                        "delete_user"
                    };
                    put("op", FieldValue::from(op));
                    put("name", FieldValue::from(name.as_str()));
                }
                MetaCommand::ClearPermission { user, vhost } => {
                    put("op", FieldValue::from("clear_permission"));
                    put("user", FieldValue::from(user.as_str()));
                    put("vhost", FieldValue::from(vhost.as_str()));
                }
                MetaCommand::ClearTopicPermission {
                    user,
                    vhost,
                    exchange,
                } => {
                    put("op", FieldValue::from("clear_topic_permission"));
                    put("user", FieldValue::from(user.as_str()));
                    put("vhost", FieldValue::from(vhost.as_str()));
                    put("exchange", FieldValue::from(exchange.as_str()));
                }
                MetaCommand::DeletePolicy { vhost, name, kind } => {
                    put("op", FieldValue::from("delete_policy"));
                    put("vhost", FieldValue::from(vhost.as_str()));
                    put("name", FieldValue::from(name.as_str()));
                    // (Absent before operator policies existed: a policy.)
                    if *kind == PolicyKind::Operator {
                        put("operator", FieldValue::Bool(true));
                    }
                }
                MetaCommand::DeleteExchange { vhost, name } => {
                    put("op", FieldValue::from("delete_exchange"));
                    put("vhost", FieldValue::from(vhost.as_str()));
                    put("name", FieldValue::from(name.as_str()));
                }
                MetaCommand::DeleteQueue { vhost, name } => {
                    put("op", FieldValue::from("delete_queue"));
                    put("vhost", FieldValue::from(vhost.as_str()));
                    put("name", FieldValue::from(name.as_str()));
                }
                MetaCommand::DropTransient { home, before } => {
                    put("op", FieldValue::from("drop_transient"));
                    put("home", FieldValue::from(home.as_str()));
                    // (Queue counters are below 2^40: "every queue",
                    // u64::MAX, travels as i64::MAX, which means the same.)
                    put(
                        "before",
                        FieldValue::I64(i64::try_from(*before).unwrap_or(i64::MAX)),
                    );
                }
                MetaCommand::Unbind { vhost, binding } => {
                    put("op", FieldValue::from("unbind"));
                    put("vhost", FieldValue::from(vhost.as_str()));
                    put("binding", FieldValue::Table(binding_record(binding)));
                }
                // Puts have a definition (above).
                _ => put("op", FieldValue::from("none")),
            }
        }
        let mut buf = BytesMut::new();
        // Definitions are stored as field tables already; a table too large
        // to encode cannot have been made.
        if t.encode(&mut buf).is_err() {
            buf.clear();
        }
        buf.to_vec()
    }

    /// Decodes [`to_wire`](Self::to_wire)'s form; an error says what is wrong.
    pub fn from_wire(bytes: &[u8]) -> Result<MetaCommand, String> {
        let (t, _) = FieldTable::decode(&Bytes::copy_from_slice(bytes))
            .map_err(|e| format!("not a field table: {e:?}"))?;
        let op = text(&t, "op")?;
        Ok(match op.as_str() {
            "put" => {
                let kind = match t.get("kind") {
                    Some(FieldValue::U8(k)) => DefKind::from_octet(*k),
                    _ => None,
                }
                .ok_or("no known definition kind")?;
                let Some(FieldValue::ByteArray(key)) = t.get("key") else {
                    return Err("no key".into());
                };
                MetaCommand::from_definition(kind, key, &table(&t, "record"))?
            }
            "delete_vhost" => MetaCommand::DeleteVhost {
                name: text(&t, "name")?,
            },
            "delete_user" => MetaCommand::DeleteUser {
                name: text(&t, "name")?,
            },
            "clear_permission" => MetaCommand::ClearPermission {
                user: text(&t, "user")?,
                vhost: text(&t, "vhost")?,
            },
            "clear_topic_permission" => MetaCommand::ClearTopicPermission {
                user: text(&t, "user")?,
                vhost: text(&t, "vhost")?,
                exchange: text(&t, "exchange")?,
            },
            "delete_policy" => MetaCommand::DeletePolicy {
                vhost: text(&t, "vhost")?,
                name: text(&t, "name")?,
                kind: match t.get("operator") {
                    Some(FieldValue::Bool(true)) => PolicyKind::Operator,
                    _ => PolicyKind::User,
                },
            },
            "delete_exchange" => MetaCommand::DeleteExchange {
                vhost: text(&t, "vhost")?,
                name: short(&t, "name")?,
            },
            "delete_queue" => MetaCommand::DeleteQueue {
                vhost: text(&t, "vhost")?,
                name: short(&t, "name")?,
            },
            "drop_transient" => MetaCommand::DropTransient {
                home: text(&t, "home")?,
                before: match t.get("before") {
                    Some(FieldValue::I64(n)) => u64::try_from(*n).map_err(|e| e.to_string())?,
                    _ => return Err("no field 'before'".into()),
                },
            },
            "unbind" => {
                let vhost = text(&t, "vhost")?;
                let key = scoped_name(&vhost, &[b""]);
                match MetaCommand::from_definition(DefKind::Binding, &key, &table(&t, "binding"))? {
                    MetaCommand::Bind { vhost, binding } => MetaCommand::Unbind { vhost, binding },
                    _ => return Err("not a binding".into()),
                }
            }
            other => return Err(format!("unknown operation '{other}'")),
        })
    }

    /// The command that removes what this put command puts (`None` for a
    /// command that puts nothing).
    pub fn inverse(&self) -> Option<MetaCommand> {
        Some(match self {
            MetaCommand::PutVhost { name, .. } => MetaCommand::DeleteVhost { name: name.clone() },
            MetaCommand::PutUser(u) => MetaCommand::DeleteUser {
                name: u.name.clone(),
            },
            MetaCommand::SetPermission(p) => MetaCommand::ClearPermission {
                user: p.user.clone(),
                vhost: p.vhost.clone(),
            },
            MetaCommand::SetTopicPermission(p) => MetaCommand::ClearTopicPermission {
                user: p.user.clone(),
                vhost: p.vhost.clone(),
                exchange: p.exchange.clone(),
            },
            MetaCommand::PutPolicy(p) => MetaCommand::DeletePolicy {
                vhost: p.vhost.clone(),
                name: p.name.clone(),
                kind: p.kind,
            },
            MetaCommand::DeclareExchange { vhost, exchange } => MetaCommand::DeleteExchange {
                vhost: vhost.clone(),
                name: exchange.name.clone(),
            },
            MetaCommand::DeclareQueue { vhost, queue } => MetaCommand::DeleteQueue {
                vhost: vhost.clone(),
                name: queue.name.clone(),
            },
            MetaCommand::Bind { vhost, binding } => MetaCommand::Unbind {
                vhost: vhost.clone(),
                binding: binding.clone(),
            },
            _ => return None,
        })
    }

    /// What it names, for logs.
    pub fn describe(&self) -> String {
        match self {
            MetaCommand::PutVhost { name, .. } => format!("put vhost '{name}'"),
            MetaCommand::DeleteVhost { name } => format!("delete vhost '{name}'"),
            MetaCommand::PutUser(u) => format!("put user '{}'", u.name),
            MetaCommand::DeleteUser { name } => format!("delete user '{name}'"),
            MetaCommand::SetPermission(p) => {
                format!("set permissions of '{}' in vhost '{}'", p.user, p.vhost)
            }
            MetaCommand::ClearPermission { user, vhost } => {
                format!("clear permissions of '{user}' in vhost '{vhost}'")
            }
            MetaCommand::SetTopicPermission(p) => format!(
                "set topic permissions of '{}' on '{}' in vhost '{}'",
                p.user, p.exchange, p.vhost
            ),
            MetaCommand::ClearTopicPermission {
                user,
                vhost,
                exchange,
            } => format!("clear topic permissions of '{user}' on '{exchange}' in vhost '{vhost}'"),
            MetaCommand::PutPolicy(p) => {
                format!("put {} '{}' in vhost '{}'", p.kind.noun(), p.name, p.vhost)
            }
            MetaCommand::DeletePolicy { vhost, name, kind } => {
                format!("delete {} '{name}' in vhost '{vhost}'", kind.noun())
            }
            MetaCommand::DeclareExchange { vhost, exchange } => {
                format!("declare exchange '{}' in vhost '{vhost}'", exchange.name)
            }
            MetaCommand::DeleteExchange { vhost, name } => {
                format!("delete exchange '{name}' in vhost '{vhost}'")
            }
            MetaCommand::DeclareQueue { vhost, queue } => {
                format!("declare queue '{}' in vhost '{vhost}'", queue.name)
            }
            MetaCommand::DeleteQueue { vhost, name } => {
                format!("delete queue '{name}' in vhost '{vhost}'")
            }
            MetaCommand::DropTransient { home, .. } => {
                format!("drop the transient queues of node '{home}'")
            }
            MetaCommand::Bind { vhost, binding } => {
                format!("bind from '{}' in vhost '{vhost}'", binding.source)
            }
            MetaCommand::Unbind { vhost, binding } => {
                format!("unbind from '{}' in vhost '{vhost}'", binding.source)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(cmd: MetaCommand) {
        let d = cmd.definition().expect("a putting command");
        let back = MetaCommand::from_definition(d.kind, &d.key, &d.record).expect("decodes");
        assert_eq!(back.definition(), Some(d.clone()), "{}", cmd.describe());
        // The wire form carries it whole, and so does its inverse's.
        let wired = MetaCommand::from_wire(&cmd.to_wire()).expect("wire decodes");
        assert_eq!(wired.definition(), Some(d), "{}", cmd.describe());
        let inverse = cmd.inverse().expect("a put has an inverse");
        let back = MetaCommand::from_wire(&inverse.to_wire()).expect("inverse decodes");
        assert_eq!(back.describe(), inverse.describe());
        assert_eq!(back.to_wire(), inverse.to_wire());
    }

    #[test]
    fn every_stored_definition_decodes_to_the_command_that_stored_it() {
        round_trip(MetaCommand::PutVhost {
            name: "v".into(),
            limits: VhostLimits {
                max_connections: Some(3),
                max_queues: None,
            },
        });
        round_trip(MetaCommand::PutUser(User {
            name: "u".into(),
            password_hash: Some("h".into()),
            tags: vec!["administrator".into(), "impersonator".into()],
        }));
        round_trip(MetaCommand::SetPermission(PermissionDef {
            user: "u".into(),
            vhost: "v".into(),
            configure: ".*".into(),
            write: "".into(),
            read: "^a".into(),
        }));
        round_trip(MetaCommand::SetTopicPermission(TopicPermissionDef {
            user: "u".into(),
            vhost: "v".into(),
            exchange: "amq.topic".into(),
            write: "^x".into(),
            read: ".*".into(),
        }));
        let mut args = FieldTable::new();
        args.insert(s("x-max-length"), FieldValue::I64(5));
        round_trip(MetaCommand::DeclareExchange {
            vhost: "v".into(),
            exchange: ExchangeDef {
                name: s("x"),
                kind: ExchangeKind::Topic,
                durable: true,
                auto_delete: true,
                internal: false,
                arguments: args.clone(),
            },
        });
        round_trip(MetaCommand::DeclareQueue {
            vhost: "v".into(),
            queue: QueueDef {
                name: s("q"),
                id: 42,
                durable: true,
                exclusive: false,
                auto_delete: false,
                arguments: args.clone(),
                home: None,
                members: Vec::new(),
                replaces: None,
            },
        });
        // A cluster's log carries transient objects too.
        round_trip(MetaCommand::DeclareQueue {
            vhost: "v".into(),
            queue: QueueDef {
                name: s("amq.gen-1"),
                id: 43,
                durable: false,
                exclusive: true,
                auto_delete: true,
                arguments: args.clone(),
                home: Some("n1".into()),
                members: Vec::new(),
                replaces: None,
            },
        });
        // A replicated queue's record names its members.
        round_trip(MetaCommand::DeclareQueue {
            vhost: "v".into(),
            queue: QueueDef {
                name: s("qq"),
                id: 44,
                durable: true,
                exclusive: false,
                auto_delete: false,
                arguments: args.clone(),
                home: Some("n2".into()),
                members: vec!["n2".into(), "n1".into(), "n3".into()],
                replaces: None,
            },
        });
        // One that took over a classic queue names it.
        round_trip(MetaCommand::DeclareQueue {
            vhost: "v".into(),
            queue: QueueDef {
                name: s("mirrored"),
                id: 46,
                durable: true,
                exclusive: false,
                auto_delete: false,
                arguments: args.clone(),
                home: Some("n1".into()),
                members: vec!["n1".into(), "n2".into()],
                replaces: Some(45),
            },
        });
        round_trip(MetaCommand::DeclareExchange {
            vhost: "v".into(),
            exchange: ExchangeDef {
                name: s("t"),
                kind: ExchangeKind::Fanout,
                durable: false,
                auto_delete: false,
                internal: false,
                arguments: FieldTable::new(),
            },
        });
        round_trip(MetaCommand::Bind {
            vhost: "v".into(),
            binding: BindingDef {
                source: s("x"),
                destination: Destination::Exchange(s("y")),
                routing_key: s("a.#"),
                arguments: args,
            },
        });
    }

    /// An operator policy is stored and travels as one, apart from a
    /// policy of the same name, and so does its deletion.
    #[test]
    fn operator_policies_keep_their_kind() {
        let definition: serde_json::Map<String, serde_json::Value> =
            [("max-length".to_owned(), serde_json::json!(5))]
                .into_iter()
                .collect();
        let apply = crate::policy::ApplyTo::Queues;
        let op = Policy::of_kind(
            PolicyKind::Operator,
            "v",
            "cap",
            "^q",
            apply,
            1,
            definition.clone(),
        )
        .expect("valid");
        let user = Policy::new("v", "cap", "^q", apply, 1, definition).expect("valid");
        let (op, user) = (MetaCommand::PutPolicy(op), MetaCommand::PutPolicy(user));
        round_trip(op.clone());
        round_trip(user.clone());
        let (d_op, d_user) = (
            op.definition().expect("put"),
            user.definition().expect("put"),
        );
        assert_eq!(
            (d_op.kind, d_user.kind),
            (DefKind::OperatorPolicy, DefKind::Policy)
        );
        for (cmd, kind) in [(op, PolicyKind::Operator), (user, PolicyKind::User)] {
            let back = MetaCommand::from_wire(&cmd.inverse().expect("inverse").to_wire())
                .expect("decodes");
            assert!(
                matches!(&back, MetaCommand::DeletePolicy { kind: k, .. } if *k == kind),
                "{back:?}"
            );
        }
    }

    #[test]
    fn drop_transient_of_every_queue_travels_too() {
        let cmd = MetaCommand::DropTransient {
            home: "n3".into(),
            before: u64::MAX,
        };
        let back = MetaCommand::from_wire(&cmd.to_wire()).expect("decodes");
        assert!(
            matches!(&back, MetaCommand::DropTransient { before, .. } if *before >= 1 << 40),
            "{back:?}"
        );
    }

    #[test]
    fn drop_transient_travels_whole() {
        let cmd = MetaCommand::DropTransient {
            home: "n2".into(),
            before: 1 << 39,
        };
        let back = MetaCommand::from_wire(&cmd.to_wire()).expect("decodes");
        assert!(
            matches!(&back, MetaCommand::DropTransient { home, before } if home == "n2" && *before == 1 << 39),
            "{back:?}"
        );
    }

    #[test]
    fn a_damaged_record_is_an_error_naming_what_is_missing() {
        let err = MetaCommand::from_definition(DefKind::Queue, b"v\0q", &FieldTable::new())
            .expect_err("no id");
        assert!(err.contains("id"), "{err}");
        let err = MetaCommand::from_definition(DefKind::Exchange, b"novhost", &FieldTable::new())
            .expect_err("no type");
        assert!(err.contains("type"), "{err}");
    }
}
