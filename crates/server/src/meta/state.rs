//! [`MetaState`]: the broker's durable metadata as plain data, and the one
//! pure function that changes it, [`MetaState::apply`].
//!
//! `apply` validates a [`MetaCommand`] against the state (the vhost and the
//! user a permission names exist, a binding's ends exist, a redeclared
//! exchange or queue is the same one), applies it, and returns the
//! definitions to put and delete, cascades included (a deleted queue takes
//! its bindings, a deleted vhost everything in it). It does no I/O and
//! reads no clock, so every node of a cluster that applies the same
//! commands in the same order holds the same state; [`MetaState::recover`]
//! rebuilds the state at boot by applying the stored definitions' commands.
//!
//! On a node alone, transient exchanges, queues and bindings are not here:
//! they live and die with the vhost's router. In a cluster every node's
//! router follows the log, so the log carries them too, each with its
//! durability: they are held here like the rest but never stored (no put or
//! delete of a definition), and a node's transient queues are dropped when
//! it restarts ([`MetaCommand::DropTransient`]).

use std::collections::BTreeMap;

use amqp_codec::ShortStr;
use bytes::Bytes;
use exchange::{BindingDef, Destination, ExchangeDef, SYSTEM_EXCHANGES};
use queue_store::{DefKind, scoped_name};

use super::command::{
    Definition, MetaCommand, PermissionDef, QueueDef, TopicPermissionDef, User, VhostLimits,
    binding_key, compile_pattern, policy_def_kind,
};
use super::error::MetaError;
use crate::policy::{Policy, PolicyKind};

/// What one command changed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Applied {
    /// Definitions to store, in order.
    pub puts: Vec<Definition>,
    /// Definitions to remove (kind and key).
    pub deletes: Vec<(DefKind, Bytes)>,
    /// The command created something that did not exist before (a put that
    /// was not a replacement, or a delete that removed something).
    pub changed_existence: bool,
}

impl Applied {
    /// Whether it changed nothing (a transient object's creation or
    /// removal stores nothing, but changes the state).
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty() && !self.changed_existence
    }

    /// The store writes that make it durable.
    pub fn writes(&self) -> Vec<queue_store::Write> {
        let mut out = Vec::with_capacity(self.puts.len() + self.deletes.len());
        for (kind, key) in &self.deletes {
            out.push(queue_store::Write::DeleteDefinition {
                kind: *kind,
                key: key.clone(),
            });
        }
        for d in &self.puts {
            out.push(queue_store::Write::PutDefinition {
                kind: d.kind,
                key: d.key.clone(),
                value: d.record.clone(),
            });
        }
        out
    }
}

/// One vhost's metadata.
#[derive(Debug, Clone, Default)]
struct VhostMeta {
    limits: VhostLimits,
    /// By user.
    permissions: BTreeMap<String, PermissionDef>,
    /// By (user, exchange).
    topic_permissions: BTreeMap<(String, String), TopicPermissionDef>,
    /// Policies and operator policies, by kind and name.
    policies: BTreeMap<(PolicyKind, String), Policy>,
    /// Exchanges by name, the system ones included (never stored).
    exchanges: BTreeMap<ShortStr, ExchangeDef>,
    /// Queues by name.
    queues: BTreeMap<ShortStr, QueueDef>,
    /// Bindings by their definition key, each with whether it is durable
    /// (both ends are: only then is it stored).
    bindings: BTreeMap<Bytes, (BindingDef, bool)>,
}

impl VhostMeta {
    fn new(limits: VhostLimits) -> VhostMeta {
        let exchanges = SYSTEM_EXCHANGES
            .iter()
            .map(|(name, kind, internal)| {
                let name = ShortStr::from_static(name);
                let def = ExchangeDef {
                    name: name.clone(),
                    kind: *kind,
                    durable: true,
                    auto_delete: false,
                    internal: *internal,
                    arguments: Default::default(),
                };
                (name, def)
            })
            .collect();
        VhostMeta {
            limits,
            exchanges,
            ..Default::default()
        }
    }

    fn is_system_exchange(name: &str) -> bool {
        SYSTEM_EXCHANGES.iter().any(|(n, _, _)| *n == name)
    }

    /// Removes the bindings `doomed` selects; the deletes of the stored
    /// (durable) ones go to `out`.
    fn drop_bindings(&mut self, out: &mut Applied, doomed: impl Fn(&BindingDef) -> bool) {
        let keys: Vec<Bytes> = self
            .bindings
            .iter()
            .filter(|(_, (b, _))| doomed(b))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if let Some((_, true)) = self.bindings.remove(&key) {
                out.deletes.push((DefKind::Binding, key));
            }
        }
    }

    /// Removes queue `name` of vhost `vhost` and the bindings to it; the
    /// deletes of what was stored go to `out`. Returns it, if it existed.
    fn remove_queue(
        &mut self,
        vhost: &str,
        name: &ShortStr,
        out: &mut Applied,
    ) -> Option<QueueDef> {
        let gone = self.queues.remove(name)?;
        self.drop_bindings(out, |b| b.destination == Destination::Queue(name.clone()));
        if gone.durable {
            out.deletes
                .push((DefKind::Queue, scoped_name(vhost, &[name.as_bytes()])));
        }
        out.changed_existence = true;
        Some(gone)
    }

    /// Whether the exchange or queue a binding names at `end` is durable.
    fn durable_end(&self, end: &Destination) -> bool {
        match end {
            Destination::Queue(q) => self.queues.get(q).is_some_and(|q| q.durable),
            Destination::Exchange(x) => self.exchanges.get(x).is_some_and(|x| x.durable),
        }
    }
}

/// The broker's durable metadata.
#[derive(Debug, Clone, Default)]
pub struct MetaState {
    vhosts: BTreeMap<String, VhostMeta>,
    users: BTreeMap<String, User>,
}

/// Where a command being applied comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The metadata log: something asked for now (or replayed in order).
    Log,
    /// A stored definition, recovered alone (`MetaState::recover`): the
    /// state it was applied in is gone.
    Stored,
}

fn not_found(what: String) -> MetaError {
    MetaError::NotFound(what)
}

/// The counter part of a queue id (a cluster's ids carry the home node's
/// tag above it; see `Node::next_queue_id`).
pub fn queue_counter(id: u64) -> u64 {
    id & ((1 << 40) - 1)
}

/// The order definitions are recovered in: what others name comes first.
fn recovery_rank(kind: DefKind) -> u8 {
    match kind {
        DefKind::Vhost => 0,
        DefKind::User => 1,
        DefKind::Permission => 2,
        DefKind::TopicPermission => 3,
        DefKind::Policy | DefKind::OperatorPolicy => 4,
        DefKind::Exchange => 5,
        DefKind::Queue => 6,
        DefKind::Binding => 7,
    }
}

impl MetaState {
    /// Rebuilds the state from stored definitions by applying each one's
    /// command, in dependency order. Returns the state, the commands that
    /// applied (in order, for the broker to build its runtime objects from),
    /// and a line per definition that could not be decoded or applied.
    pub fn recover(
        definitions: &[(DefKind, Bytes, amqp_codec::FieldTable)],
    ) -> (MetaState, Vec<MetaCommand>, Vec<String>) {
        let mut sorted: Vec<&(DefKind, Bytes, amqp_codec::FieldTable)> =
            definitions.iter().collect();
        sorted.sort_by_key(|(kind, key, _)| (recovery_rank(*kind), key.clone()));
        let mut state = MetaState::default();
        let mut commands = Vec::with_capacity(sorted.len());
        let mut problems = Vec::new();
        for (kind, key, record) in sorted {
            let printable = String::from_utf8_lossy(key).replace('\0', "/");
            match MetaCommand::from_definition(*kind, key, record) {
                Err(e) => problems.push(format!("{kind:?} '{printable}': {e}")),
                Ok(cmd) => match state.apply_as(&cmd, Origin::Stored) {
                    Ok(_) => commands.push(cmd),
                    Err(e) => problems.push(format!("{kind:?} '{printable}': {e}")),
                },
            }
        }
        (state, commands, problems)
    }

    /// Every definition the state holds (what a fresh store would need to
    /// rebuild it, and in a cluster the transient objects too: a snapshot
    /// carries them), in recovery order.
    pub fn definitions(&self) -> Vec<Definition> {
        let mut out = Vec::new();
        let mut put = |c: MetaCommand| out.extend(c.definition());
        for (name, v) in &self.vhosts {
            put(MetaCommand::PutVhost {
                name: name.clone(),
                limits: v.limits,
            });
        }
        for u in self.users.values() {
            put(MetaCommand::PutUser(u.clone()));
        }
        for (vhost, v) in &self.vhosts {
            v.permissions
                .values()
                .for_each(|p| put(MetaCommand::SetPermission(p.clone())));
            v.topic_permissions
                .values()
                .for_each(|p| put(MetaCommand::SetTopicPermission(p.clone())));
            v.policies
                .values()
                .for_each(|p| put(MetaCommand::PutPolicy(p.clone())));
            for x in v.exchanges.values() {
                if !VhostMeta::is_system_exchange(&x.name) {
                    put(MetaCommand::DeclareExchange {
                        vhost: vhost.clone(),
                        exchange: x.clone(),
                    });
                }
            }
            for q in v.queues.values() {
                put(MetaCommand::DeclareQueue {
                    vhost: vhost.clone(),
                    queue: q.clone(),
                });
            }
            for (b, _) in v.bindings.values() {
                put(MetaCommand::Bind {
                    vhost: vhost.clone(),
                    binding: b.clone(),
                });
            }
        }
        out.sort_by_key(|d| (recovery_rank(d.kind), d.key.clone()));
        out
    }

    /// Whether any user or vhost exists (an empty data directory has none).
    pub fn is_empty(&self) -> bool {
        self.vhosts.is_empty() && self.users.is_empty()
    }

    /// Queue `name` of `vhost`, as declared.
    pub fn queue(&self, vhost: &str, name: &str) -> Option<&QueueDef> {
        self.vhosts.get(vhost)?.queues.get(name)
    }

    fn vhost_mut(&mut self, name: &str) -> Result<&mut VhostMeta, MetaError> {
        self.vhosts
            .get_mut(name)
            .ok_or_else(|| not_found(format!("no vhost '{name}'")))
    }

    /// Validates `command` and applies it. On error nothing changed.
    pub fn apply(&mut self, command: &MetaCommand) -> Result<Applied, MetaError> {
        self.apply_as(command, Origin::Log)
    }

    fn apply_as(&mut self, command: &MetaCommand, origin: Origin) -> Result<Applied, MetaError> {
        let mut out = Applied::default();
        match command {
            MetaCommand::PutVhost { name, limits } => {
                match self.vhosts.get_mut(name) {
                    Some(v) => v.limits = *limits,
                    None => {
                        self.vhosts.insert(name.clone(), VhostMeta::new(*limits));
                        out.changed_existence = true;
                    }
                }
                out.puts.extend(command.definition());
            }
            MetaCommand::DeleteVhost { name } => {
                let v = self
                    .vhosts
                    .remove(name)
                    .ok_or_else(|| not_found(format!("no vhost '{name}'")))?;
                for (key, (_, durable)) in v.bindings {
                    if durable {
                        out.deletes.push((DefKind::Binding, key));
                    }
                }
                for q in v.queues.values().filter(|q| q.durable) {
                    out.deletes
                        .push((DefKind::Queue, scoped_name(name, &[q.name.as_bytes()])));
                }
                for (x, def) in &v.exchanges {
                    if def.durable && !VhostMeta::is_system_exchange(x) {
                        out.deletes
                            .push((DefKind::Exchange, scoped_name(name, &[x.as_bytes()])));
                    }
                }
                for (kind, p) in v.policies.keys() {
                    out.deletes
                        .push((policy_def_kind(*kind), scoped_name(name, &[p.as_bytes()])));
                }
                for (user, exchange) in v.topic_permissions.keys() {
                    out.deletes.push((
                        DefKind::TopicPermission,
                        scoped_name(name, &[user.as_bytes(), exchange.as_bytes()]),
                    ));
                }
                for user in v.permissions.keys() {
                    out.deletes
                        .push((DefKind::Permission, scoped_name(name, &[user.as_bytes()])));
                }
                out.deletes
                    .push((DefKind::Vhost, Bytes::copy_from_slice(name.as_bytes())));
                out.changed_existence = true;
            }
            MetaCommand::PutUser(u) => {
                out.changed_existence = self.users.insert(u.name.clone(), u.clone()).is_none();
                out.puts.extend(command.definition());
            }
            MetaCommand::DeleteUser { name } => {
                self.users
                    .remove(name)
                    .ok_or_else(|| not_found(format!("no user '{name}'")))?;
                for (vhost, v) in &mut self.vhosts {
                    if v.permissions.remove(name).is_some() {
                        out.deletes
                            .push((DefKind::Permission, scoped_name(vhost, &[name.as_bytes()])));
                    }
                    let topics: Vec<(String, String)> = v
                        .topic_permissions
                        .keys()
                        .filter(|(u, _)| u == name)
                        .cloned()
                        .collect();
                    for key in topics {
                        v.topic_permissions.remove(&key);
                        out.deletes.push((
                            DefKind::TopicPermission,
                            scoped_name(vhost, &[key.0.as_bytes(), key.1.as_bytes()]),
                        ));
                    }
                }
                out.deletes
                    .push((DefKind::User, Bytes::copy_from_slice(name.as_bytes())));
                out.changed_existence = true;
            }
            MetaCommand::SetPermission(p) => {
                if !self.users.contains_key(&p.user) {
                    return Err(not_found(format!("no user '{}'", p.user)));
                }
                for pattern in [&p.configure, &p.write, &p.read] {
                    compile_pattern(pattern)
                        .map_err(|e| MetaError::Invalid(format!("{pattern:?}: {e}")))?;
                }
                let v = self.vhost_mut(&p.vhost)?;
                out.changed_existence = v.permissions.insert(p.user.clone(), p.clone()).is_none();
                out.puts.extend(command.definition());
            }
            MetaCommand::ClearPermission { user, vhost } => {
                self.vhost_mut(vhost)?
                    .permissions
                    .remove(user)
                    .ok_or_else(|| not_found(format!("no permissions of '{user}' in '{vhost}'")))?;
                out.deletes
                    .push((DefKind::Permission, scoped_name(vhost, &[user.as_bytes()])));
                out.changed_existence = true;
            }
            MetaCommand::SetTopicPermission(p) => {
                if !self.users.contains_key(&p.user) {
                    return Err(not_found(format!("no user '{}'", p.user)));
                }
                let v = self.vhost_mut(&p.vhost)?;
                out.changed_existence = v
                    .topic_permissions
                    .insert((p.user.clone(), p.exchange.clone()), p.clone())
                    .is_none();
                out.puts.extend(command.definition());
            }
            MetaCommand::ClearTopicPermission {
                user,
                vhost,
                exchange,
            } => {
                self.vhost_mut(vhost)?
                    .topic_permissions
                    .remove(&(user.clone(), exchange.clone()))
                    .ok_or_else(|| {
                        not_found(format!(
                            "no topic permissions of '{user}' on '{exchange}' in '{vhost}'"
                        ))
                    })?;
                out.deletes.push((
                    DefKind::TopicPermission,
                    scoped_name(vhost, &[user.as_bytes(), exchange.as_bytes()]),
                ));
                out.changed_existence = true;
            }
            MetaCommand::PutPolicy(p) => {
                let v = self.vhost_mut(&p.vhost)?;
                out.changed_existence = v
                    .policies
                    .insert((p.kind, p.name.clone()), p.clone())
                    .is_none();
                out.puts.extend(command.definition());
            }
            MetaCommand::DeletePolicy { vhost, name, kind } => {
                self.vhost_mut(vhost)?
                    .policies
                    .remove(&(*kind, name.clone()))
                    .ok_or_else(|| {
                        not_found(format!("no {} '{name}' in '{vhost}'", kind.noun()))
                    })?;
                out.deletes.push((
                    policy_def_kind(*kind),
                    scoped_name(vhost, &[name.as_bytes()]),
                ));
                out.changed_existence = true;
            }
            MetaCommand::DeclareExchange { vhost, exchange } => {
                let v = self.vhost_mut(vhost)?;
                match v.exchanges.get(&exchange.name) {
                    Some(existing) if existing == exchange => {}
                    Some(_) => {
                        return Err(MetaError::Conflict(format!(
                            "exchange '{}' in vhost '{vhost}' exists with other properties",
                            exchange.name
                        )));
                    }
                    None => {
                        v.exchanges.insert(exchange.name.clone(), exchange.clone());
                        out.changed_existence = true;
                        if exchange.durable {
                            out.puts.extend(command.definition());
                        }
                    }
                }
            }
            MetaCommand::DeleteExchange { vhost, name } => {
                if VhostMeta::is_system_exchange(name) {
                    return Err(MetaError::Invalid(format!("exchange '{name}' is built in")));
                }
                let v = self.vhost_mut(vhost)?;
                let gone = v
                    .exchanges
                    .remove(name)
                    .ok_or_else(|| not_found(format!("no exchange '{name}' in '{vhost}'")))?;
                v.drop_bindings(&mut out, |b| {
                    b.source == *name || b.destination == Destination::Exchange(name.clone())
                });
                if gone.durable {
                    out.deletes
                        .push((DefKind::Exchange, scoped_name(vhost, &[name.as_bytes()])));
                }
                out.changed_existence = true;
            }
            MetaCommand::DeclareQueue { vhost, queue } => {
                let v = self.vhost_mut(vhost)?;
                match v.queues.get(&queue.name) {
                    // A replicated queue's members changed (add_member,
                    // delete_member): its record is replaced.
                    Some(existing)
                        if existing.id == queue.id && existing.members != queue.members =>
                    {
                        v.queues.insert(queue.name.clone(), queue.clone());
                        out.puts.extend(command.definition());
                    }
                    Some(existing) if existing.id == queue.id => {}
                    // A durable classic queue a mirroring policy came to
                    // match becomes replicated under a new id (its
                    // bindings, by name, stay).
                    Some(existing)
                        if queue.replaces == Some(existing.id)
                            && existing.members.is_empty()
                            && !queue.members.is_empty()
                            && existing.durable
                            && queue.durable =>
                    {
                        v.queues.insert(queue.name.clone(), queue.clone());
                        out.puts.extend(command.definition());
                    }
                    Some(_) => {
                        return Err(MetaError::Conflict(format!(
                            "queue '{}' in vhost '{vhost}' exists",
                            queue.name
                        )));
                    }
                    // The classic queue to take over was deleted after
                    // the takeover was asked for: nothing to replicate.
                    // (A stored record of a takeover has no classic
                    // queue beside it: it is recovered as it is.)
                    None if queue.replaces.is_some() && origin == Origin::Log => {
                        return Err(not_found(format!(
                            "queue '{}' in vhost '{vhost}' was deleted before it could be replicated",
                            queue.name
                        )));
                    }
                    None => {
                        v.queues.insert(queue.name.clone(), queue.clone());
                        out.changed_existence = true;
                        if queue.durable {
                            out.puts.extend(command.definition());
                        }
                    }
                }
            }
            MetaCommand::DeleteQueue { vhost, name } => {
                self.vhost_mut(vhost)?
                    .remove_queue(vhost, name, &mut out)
                    .ok_or_else(|| not_found(format!("no queue '{name}' in '{vhost}'")))?;
            }
            MetaCommand::DropTransient { home, before } => {
                for (vhost, v) in self.vhosts.iter_mut() {
                    let doomed: Vec<ShortStr> = v
                        .queues
                        .values()
                        .filter(|q| {
                            (!q.durable || q.exclusive)
                                && q.home.as_deref() == Some(home.as_str())
                                && queue_counter(q.id) < *before
                        })
                        .map(|q| q.name.clone())
                        .collect();
                    for name in doomed {
                        // (A durable exclusive one is deleted from the
                        // store too: RabbitMQ deletes it with its
                        // connection.)
                        v.remove_queue(vhost, &name, &mut out);
                    }
                }
            }
            MetaCommand::Bind { vhost, binding } => {
                let v = self.vhost_mut(vhost)?;
                if !v.exchanges.contains_key(&binding.source) {
                    return Err(not_found(format!(
                        "no durable exchange '{}' in '{vhost}'",
                        binding.source
                    )));
                }
                let dest_known = match &binding.destination {
                    Destination::Queue(q) => v.queues.contains_key(q),
                    Destination::Exchange(x) => v.exchanges.contains_key(x),
                };
                if !dest_known {
                    return Err(not_found(format!(
                        "no durable destination {:?} in '{vhost}'",
                        binding.destination
                    )));
                }
                let durable = v.durable_end(&Destination::Exchange(binding.source.clone()))
                    && v.durable_end(&binding.destination);
                let key = binding_key(vhost, binding);
                if let std::collections::btree_map::Entry::Vacant(slot) = v.bindings.entry(key) {
                    slot.insert((binding.clone(), durable));
                    out.changed_existence = true;
                    if durable {
                        out.puts.extend(command.definition());
                    }
                }
            }
            MetaCommand::Unbind { vhost, binding } => {
                let v = self.vhost_mut(vhost)?;
                let key = binding_key(vhost, binding);
                if let Some((_, durable)) = v.bindings.remove(&key) {
                    if durable {
                        out.deletes.push((DefKind::Binding, key));
                    }
                    out.changed_existence = true;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use amqp_codec::FieldTable;
    use exchange::ExchangeKind;
    use proptest::prelude::*;

    use super::*;

    fn user(name: &str) -> User {
        User {
            name: name.into(),
            password_hash: None,
            tags: vec![],
        }
    }

    fn exchange(name: &str, kind: ExchangeKind) -> ExchangeDef {
        ExchangeDef {
            name: ShortStr::try_from(name).expect("short"),
            kind,
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: FieldTable::new(),
        }
    }

    fn binding(source: &str, dest: Destination) -> BindingDef {
        BindingDef {
            source: ShortStr::try_from(source).expect("short"),
            destination: dest,
            routing_key: ShortStr::from_static("k"),
            arguments: FieldTable::new(),
        }
    }

    fn q(name: &str) -> Destination {
        Destination::Queue(ShortStr::try_from(name).expect("short"))
    }

    #[test]
    fn objects_need_their_vhost_and_permissions_their_user() {
        let mut st = MetaState::default();
        let perm = MetaCommand::SetPermission(PermissionDef {
            user: "u".into(),
            vhost: "v".into(),
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        });
        assert!(matches!(st.apply(&perm), Err(MetaError::NotFound(_))));
        st.apply(&MetaCommand::PutUser(user("u"))).expect("user");
        assert!(matches!(st.apply(&perm), Err(MetaError::NotFound(_))));
        st.apply(&MetaCommand::PutVhost {
            name: "v".into(),
            limits: VhostLimits::default(),
        })
        .expect("vhost");
        assert!(st.apply(&perm).expect("permission").changed_existence);
        let bad = MetaCommand::SetPermission(PermissionDef {
            user: "u".into(),
            vhost: "v".into(),
            configure: "(".into(),
            write: ".*".into(),
            read: ".*".into(),
        });
        assert!(matches!(st.apply(&bad), Err(MetaError::Invalid(_))));
    }

    /// A state holding vhost `v`.
    fn with_vhost_v() -> MetaState {
        let mut st = MetaState::default();
        st.apply(&MetaCommand::PutVhost {
            name: "v".into(),
            limits: VhostLimits::default(),
        })
        .expect("vhost");
        st
    }

    fn cluster_queue(name: &str, id: u64, durable: bool, exclusive: bool, home: &str) -> QueueDef {
        QueueDef {
            name: ShortStr::try_from(name).expect("short"),
            id,
            durable,
            exclusive,
            auto_delete: false,
            arguments: FieldTable::new(),
            home: Some(home.into()),
            members: Vec::new(),
            replaces: None,
        }
    }

    #[test]
    fn transient_objects_are_held_but_never_stored_and_go_with_their_node_s_run() {
        let mut st = with_vhost_v();
        let v = || "v".to_owned();
        let mut transient_x = exchange("tx", ExchangeKind::Fanout);
        transient_x.durable = false;
        let applied = st
            .apply(&MetaCommand::DeclareExchange {
                vhost: v(),
                exchange: transient_x,
            })
            .expect("transient exchange");
        assert!(
            applied.puts.is_empty() && !applied.is_empty(),
            "{applied:?}"
        );
        // Node n1's queues: one transient from its previous run (id 5),
        // one exclusive from its current run (id 9), one durable (id 6);
        // and node n2's transient queue (id 2).
        for (name, id, durable, exclusive, home) in [
            ("old", 5, false, false, "n1"),
            ("new", 9, false, true, "n1"),
            ("kept", 6, true, false, "n1"),
            ("other", 2, false, false, "n2"),
        ] {
            let applied = st
                .apply(&MetaCommand::DeclareQueue {
                    vhost: v(),
                    queue: cluster_queue(name, id, durable, exclusive, home),
                })
                .expect("queue");
            assert_eq!(applied.puts.len(), usize::from(durable), "{name}");
        }
        for (source, dest) in [("tx", "old"), ("amq.fanout", "kept"), ("amq.fanout", "old")] {
            let applied = st
                .apply(&MetaCommand::Bind {
                    vhost: v(),
                    binding: binding(source, q(dest)),
                })
                .expect("bind");
            // Only a binding between durable ends is stored.
            assert_eq!(
                applied.puts.len(),
                usize::from(dest == "kept" && source != "tx")
            );
        }
        let applied = st
            .apply(&MetaCommand::DropTransient {
                home: "n1".into(),
                before: 7,
            })
            .expect("drop");
        // Nothing stored goes; the old run's queue and its bindings do.
        assert!(applied.deletes.is_empty(), "{applied:?}");
        assert!(applied.changed_existence);
        let names: Vec<String> = st.vhosts["v"]
            .queues
            .keys()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, ["kept", "new", "other"]);
        assert_eq!(st.vhosts["v"].bindings.len(), 1);
        // The snapshot form carries the transient objects and rebuilds them.
        let defs: Vec<_> = st
            .definitions()
            .into_iter()
            .map(|d| (d.kind, d.key, d.record))
            .collect();
        let (recovered, _, problems) = MetaState::recover(&defs);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(recovered.definitions(), st.definitions());
        assert!(!recovered.vhosts["v"].exchanges["tx"].durable);
        // Deleting the transient exchange stores nothing either.
        let applied = st
            .apply(&MetaCommand::DeleteExchange {
                vhost: v(),
                name: ShortStr::from_static("tx"),
            })
            .expect("delete");
        assert!(applied.deletes.is_empty() && applied.changed_existence);
    }

    #[test]
    fn deleting_a_queue_takes_its_bindings_and_a_vhost_everything() {
        let mut st = with_vhost_v();
        let v = || "v".to_owned();
        st.apply(&MetaCommand::DeclareExchange {
            vhost: v(),
            exchange: exchange("x", ExchangeKind::Topic),
        })
        .expect("exchange");
        st.apply(&MetaCommand::DeclareQueue {
            vhost: v(),
            queue: QueueDef {
                name: ShortStr::from_static("q"),
                id: 1,
                durable: true,
                exclusive: false,
                auto_delete: false,
                arguments: FieldTable::new(),
                home: None,
                members: Vec::new(),
                replaces: None,
            },
        })
        .expect("queue");
        st.apply(&MetaCommand::Bind {
            vhost: v(),
            binding: binding("x", q("q")),
        })
        .expect("bind");
        st.apply(&MetaCommand::Bind {
            vhost: v(),
            binding: binding("amq.topic", q("q")),
        })
        .expect("bind from a built-in exchange");
        // A binding to a queue the metadata does not hold (transient) is refused.
        assert!(
            st.apply(&MetaCommand::Bind {
                vhost: v(),
                binding: binding("x", q("transient")),
            })
            .is_err()
        );
        let gone = st
            .apply(&MetaCommand::DeleteQueue {
                vhost: v(),
                name: ShortStr::from_static("q"),
            })
            .expect("delete");
        let bindings = gone
            .deletes
            .iter()
            .filter(|(k, _)| *k == DefKind::Binding)
            .count();
        assert_eq!(bindings, 2);
        let all = st
            .apply(&MetaCommand::DeleteVhost { name: v() })
            .expect("delete vhost");
        assert!(
            all.deletes
                .contains(&(DefKind::Exchange, scoped_name("v", &[b"x"])))
        );
        assert!(st.definitions().is_empty());
    }

    #[test]
    fn a_mirrored_queue_takes_over_its_classic_namesake_and_keeps_its_bindings() {
        let mut st = with_vhost_v();
        let v = || "v".to_owned();
        let classic = cluster_queue("q", 1, true, false, "n2");
        st.apply(&MetaCommand::DeclareQueue {
            vhost: v(),
            queue: classic.clone(),
        })
        .expect("classic");
        st.apply(&MetaCommand::Bind {
            vhost: v(),
            binding: binding("amq.topic", q("q")),
        })
        .expect("bind");
        let replicated = |id: u64, replaces: Option<u64>| QueueDef {
            id,
            members: vec!["n2".into(), "n1".into()],
            replaces,
            ..classic.clone()
        };
        // Without naming the queue it replaces, a second queue of that name
        // is a conflict; naming another id is too.
        assert!(
            st.apply(&MetaCommand::DeclareQueue {
                vhost: v(),
                queue: replicated(2, None),
            })
            .is_err()
        );
        assert!(
            st.apply(&MetaCommand::DeclareQueue {
                vhost: v(),
                queue: replicated(2, Some(7)),
            })
            .is_err()
        );
        let applied = st
            .apply(&MetaCommand::DeclareQueue {
                vhost: v(),
                queue: replicated(2, Some(1)),
            })
            .expect("takeover");
        assert_eq!(applied.puts.len(), 1, "the new record is stored");
        assert_eq!(st.vhosts["v"].queues["q"], replicated(2, Some(1)));
        assert_eq!(st.vhosts["v"].bindings.len(), 1, "the binding stays");
        // Applied again (a replayed log), nothing changes; a replicated
        // queue is never taken over again.
        st.apply(&MetaCommand::DeclareQueue {
            vhost: v(),
            queue: replicated(2, Some(1)),
        })
        .expect("replay");
        assert!(
            st.apply(&MetaCommand::DeclareQueue {
                vhost: v(),
                queue: replicated(3, Some(2)),
            })
            .is_err()
        );
        // Its stored record recovers as it is (alone, at boot).
        let defs: Vec<_> = st
            .definitions()
            .into_iter()
            .map(|d| (d.kind, d.key, d.record))
            .collect();
        let (recovered, _, problems) = MetaState::recover(&defs);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(recovered.vhosts["v"].queues["q"], replicated(2, Some(1)));
        // A takeover of a classic queue deleted meanwhile is refused: it
        // does not bring the queue back.
        st.apply(&MetaCommand::DeleteQueue {
            vhost: v(),
            name: ShortStr::from_static("q"),
        })
        .expect("delete");
        assert!(matches!(
            st.apply(&MetaCommand::DeclareQueue {
                vhost: v(),
                queue: replicated(3, Some(2)),
            }),
            Err(MetaError::NotFound(_))
        ));
        assert!(!st.vhosts["v"].queues.contains_key("q"));
    }

    #[test]
    fn a_redeclare_with_other_properties_is_a_conflict_and_changes_nothing() {
        let mut st = with_vhost_v();
        let declare = |kind| MetaCommand::DeclareExchange {
            vhost: "v".into(),
            exchange: exchange("x", kind),
        };
        assert!(
            st.apply(&declare(ExchangeKind::Direct))
                .expect("new")
                .changed_existence
        );
        assert!(
            st.apply(&declare(ExchangeKind::Direct))
                .expect("same")
                .is_empty()
        );
        assert!(matches!(
            st.apply(&declare(ExchangeKind::Fanout)),
            Err(MetaError::Conflict(_))
        ));
    }

    /// A command over a small universe of names, so that sequences collide.
    fn command() -> impl Strategy<Value = MetaCommand> {
        let vhost = prop::sample::select(vec!["v1", "v2"]).prop_map(str::to_owned);
        let name = prop::sample::select(vec!["a", "b", "c"]);
        let user_name = prop::sample::select(vec!["u1", "u2"]).prop_map(str::to_owned);
        let dest = (any::<bool>(), name.clone()).prop_map(|(to_queue, n)| {
            let n = ShortStr::try_from(n).expect("short");
            if to_queue {
                Destination::Queue(n)
            } else {
                Destination::Exchange(n)
            }
        });
        let source = prop::sample::select(vec!["a", "b", "c", "amq.topic"]);
        prop_oneof![
            (vhost.clone(), 0..3usize).prop_map(|(name, n)| MetaCommand::PutVhost {
                name,
                limits: VhostLimits {
                    max_connections: (n > 0).then_some(n),
                    max_queues: None,
                },
            }),
            vhost
                .clone()
                .prop_map(|name| MetaCommand::DeleteVhost { name }),
            user_name
                .clone()
                .prop_map(|n| MetaCommand::PutUser(user(&n))),
            user_name
                .clone()
                .prop_map(|name| MetaCommand::DeleteUser { name }),
            (user_name.clone(), vhost.clone()).prop_map(|(user, vhost)| {
                MetaCommand::SetPermission(PermissionDef {
                    user,
                    vhost,
                    configure: ".*".into(),
                    write: "".into(),
                    read: "^r".into(),
                })
            }),
            (user_name.clone(), vhost.clone())
                .prop_map(|(user, vhost)| MetaCommand::ClearPermission { user, vhost }),
            (user_name, vhost.clone(), name.clone()).prop_map(|(user, vhost, x)| {
                MetaCommand::SetTopicPermission(TopicPermissionDef {
                    user,
                    vhost,
                    exchange: x.to_owned(),
                    write: ".*".into(),
                    read: ".*".into(),
                })
            }),
            (vhost.clone(), name.clone(), any::<bool>()).prop_map(|(vhost, n, topic)| {
                MetaCommand::DeclareExchange {
                    vhost,
                    exchange: exchange(
                        n,
                        if topic {
                            ExchangeKind::Topic
                        } else {
                            ExchangeKind::Direct
                        },
                    ),
                }
            }),
            (vhost.clone(), name.clone()).prop_map(|(vhost, n)| MetaCommand::DeleteExchange {
                vhost,
                name: ShortStr::try_from(n).expect("short"),
            }),
            (vhost.clone(), name.clone(), 1..3u64).prop_map(|(vhost, n, id)| {
                MetaCommand::DeclareQueue {
                    vhost,
                    queue: QueueDef {
                        name: ShortStr::try_from(n).expect("short"),
                        id,
                        durable: true,
                        exclusive: false,
                        auto_delete: false,
                        arguments: FieldTable::new(),
                        home: None,
                        members: Vec::new(),
                        replaces: None,
                    },
                }
            }),
            (vhost.clone(), name.clone()).prop_map(|(vhost, n)| MetaCommand::DeleteQueue {
                vhost,
                name: ShortStr::try_from(n).expect("short"),
            }),
            (vhost.clone(), source.clone(), dest.clone()).prop_map(|(vhost, s, d)| {
                MetaCommand::Bind {
                    vhost,
                    binding: binding(s, d),
                }
            }),
            (vhost.clone(), source.clone(), dest.clone()).prop_map(|(vhost, s, d)| {
                MetaCommand::Unbind {
                    vhost,
                    binding: binding(s, d),
                }
            }),
            // A policy and an operator policy may share a name.
            (vhost.clone(), name.clone(), any::<bool>(), 0..3u64).prop_map(
                |(vhost, n, operator, cap)| {
                    let definition = [("max-length".to_owned(), serde_json::json!(cap))]
                        .into_iter()
                        .collect();
                    let apply = crate::policy::ApplyTo::Queues;
                    let kind = if operator {
                        PolicyKind::Operator
                    } else {
                        PolicyKind::User
                    };
                    MetaCommand::PutPolicy(
                        Policy::of_kind(kind, &vhost, n, "^a", apply, 0, definition)
                            .expect("valid policy"),
                    )
                }
            ),
            (vhost, name, any::<bool>()).prop_map(|(vhost, n, operator)| {
                MetaCommand::DeletePolicy {
                    vhost,
                    name: n.to_owned(),
                    kind: if operator {
                        PolicyKind::Operator
                    } else {
                        PolicyKind::User
                    },
                }
            }),
        ]
    }

    proptest! {
        /// Whatever the commands, what `apply` asked to store rebuilds the
        /// same state at boot, a refused command changes nothing, and every
        /// binding and permission names things that exist.
        #[test]
        fn the_stored_definitions_recover_the_same_state(
            commands in prop::collection::vec(command(), 0..60)
        ) {
            let mut st = MetaState::default();
            let mut disk: BTreeMap<(DefKind, Bytes), FieldTable> = BTreeMap::new();
            for c in &commands {
                let before = st.definitions();
                match st.apply(c) {
                    Ok(applied) => {
                        for (kind, key) in &applied.deletes {
                            disk.remove(&(*kind, key.clone()));
                        }
                        for d in applied.puts {
                            disk.insert((d.kind, d.key), d.record);
                        }
                    }
                    Err(_) => prop_assert_eq!(st.definitions(), before),
                }
                let stored: Vec<Definition> = disk
                    .iter()
                    .map(|((kind, key), record)| Definition {
                        kind: *kind,
                        key: key.clone(),
                        record: record.clone(),
                    })
                    .collect();
                let mut live = st.definitions();
                let mut stored_sorted = stored.clone();
                live.sort_by(|a, b| (a.kind, &a.key).cmp(&(b.kind, &b.key)));
                stored_sorted.sort_by(|a, b| (a.kind, &a.key).cmp(&(b.kind, &b.key)));
                prop_assert_eq!(&live, &stored_sorted);
            }
            let flat: Vec<(DefKind, Bytes, FieldTable)> = disk
                .into_iter()
                .map(|((kind, key), record)| (kind, key, record))
                .collect();
            let (recovered, _, problems) = MetaState::recover(&flat);
            prop_assert!(problems.is_empty(), "{:?}", problems);
            prop_assert_eq!(recovered.definitions(), st.definitions());
            for (vhost, v) in &st.vhosts {
                for (b, _) in v.bindings.values() {
                    prop_assert!(v.exchanges.contains_key(&b.source), "{vhost}: {b:?}");
                }
                for p in v.permissions.values() {
                    prop_assert!(st.users.contains_key(&p.user));
                }
            }
        }
    }
}
