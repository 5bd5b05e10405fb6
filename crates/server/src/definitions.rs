//! Definitions in RabbitMQ's JSON format: export everything an operator
//! would recreate a broker from (users with their hashes, vhosts,
//! permissions, topic permissions, exchanges and queues (transient ones too,
//! as RabbitMQ 3.10 exports them; not exclusive queues), and the
//! bindings between them), and import such a file — one exported by Warren
//! or by RabbitMQ (`rabbitmqctl export_definitions`, the management UI).
//! Served as `GET`/`POST /api/definitions` and loaded at boot with
//! `--load-definitions FILE`.
//!
//! Import applies vhosts, users, permissions, exchanges, policies, queues
//! and bindings in that order (RabbitMQ too applies policies before queues:
//! a queue a mirroring policy matches is declared replicated in a cluster);
//! an object that exists already must be equivalent (else the import stops
//! with the 406 text). Vhost limits and operator policies travel as
//! RabbitMQ 3.10 exports them, as `vhost-limits` and `operator_policy`
//! runtime parameters; other runtime parameters (shovels, federation) are
//! not supported yet: they are skipped, and each skipped one is logged and
//! counted in [`Imported::skipped`].

use std::sync::Arc;

use amqp_codec::{FieldTable, ShortStr};
use serde_json::{Map, Value, json};

use crate::broker::Broker;
use crate::error::AmqpError;
use crate::json::{json_to_table, limits_from_json, limits_json, table_to_json};

/// The runtime-parameter component RabbitMQ keeps vhost limits in.
const VHOST_LIMITS: &str = "vhost-limits";

/// The runtime-parameter component RabbitMQ exports operator policies as.
const OPERATOR_POLICY: &str = "operator_policy";

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Imported {
    /// Objects created or updated.
    pub applied: usize,
    /// Entries skipped because Warren does not support them yet (runtime
    /// parameters), by section.
    pub skipped: Vec<String>,
}

/// Why an import stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file is not what RabbitMQ writes.
    #[error("malformed definitions: {0}")]
    Malformed(String),
    /// An object was refused (inequivalent redeclare, bad argument...).
    #[error("{} - {}", .0.name, .0.text)]
    Refused(AmqpError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] queue_store::StoreError),
}

impl From<crate::meta::MetaError> for ImportError {
    fn from(e: crate::meta::MetaError) -> Self {
        match e {
            crate::meta::MetaError::Store(e) => ImportError::Store(e),
            other => ImportError::Refused(other.into()),
        }
    }
}

impl From<AmqpError> for ImportError {
    fn from(e: AmqpError) -> Self {
        ImportError::Refused(e)
    }
}

/// Everything, as RabbitMQ exports it.
pub fn export(broker: &Broker) -> Value {
    let mut users = broker.auth.users();
    users.sort_by(|a, b| a.name.cmp(&b.name));
    let users: Vec<Value> = users.iter().map(crate::json::user).collect();
    let mut vhosts = broker.vhost_list();
    vhosts.sort_by(|a, b| a.name().cmp(b.name()));
    let permissions: Vec<Value> = broker
        .auth
        .permissions()
        .iter()
        .map(|p| {
            json!({"user": p.user, "vhost": p.vhost, "configure": p.configure, "write": p.write, "read": p.read})
        })
        .collect();
    let topic_permissions: Vec<Value> = broker
        .auth
        .topic_permissions()
        .into_iter()
        .map(|(user, vhost, exchange, write, read)| {
            json!({"user": user, "vhost": vhost, "exchange": exchange, "write": write, "read": read})
        })
        .collect();
    let (mut queues, mut exchanges, mut bindings) = (Vec::new(), Vec::new(), Vec::new());
    let mut policies = Vec::new();
    let mut parameters = Vec::new();
    for v in &vhosts {
        policies.extend(v.policies.read().iter().map(crate::policy::Policy::to_json));
        let limits = limits_json(&v.limits.lock());
        if !limits.is_empty() {
            parameters.push(json!({
                "vhost": v.name(),
                "component": VHOST_LIMITS,
                "name": "limits",
                "value": limits,
            }));
        }
        for p in v.operator_policies.read().iter() {
            parameters.push(json!({
                "vhost": v.name(),
                "component": OPERATOR_POLICY,
                "name": p.name,
                "value": {
                    "pattern": p.pattern,
                    "apply-to": p.apply_to.as_str(),
                    "priority": p.priority,
                    "definition": p.definition,
                },
            }));
        }
        // Transient queues and exchanges too, as RabbitMQ 3.10 exports
        // them (marked `"durable": false`); exclusive queues not, they
        // belong to a connection.
        let qs: Vec<_> = v
            .queues()
            .into_iter()
            .filter(|q| q.exclusive_owner.is_none())
            .collect();
        // In a cluster, the queues other nodes host too (every node
        // exports the same definitions).
        let remote: Vec<_> = v
            .remote_queues()
            .into_iter()
            .filter(|q| !q.exclusive)
            .collect();
        let mut listed: Vec<(&ShortStr, bool, bool, &FieldTable)> = qs
            .iter()
            .map(|q| (&q.name, q.durable, q.auto_delete, &q.arguments))
            .chain(
                remote
                    .iter()
                    .map(|q| (&q.name, q.durable, q.auto_delete, &*q.arguments)),
            )
            .collect();
        listed.sort_by(|a, b| a.0.cmp(b.0));
        for (name, durable, auto_delete, arguments) in &listed {
            queues.push(json!({
                "name": name.as_str(),
                "vhost": v.name(),
                "durable": durable,
                "auto_delete": auto_delete,
                "arguments": table_to_json(arguments),
            }));
        }
        let router = v.router.read();
        let mut xs: Vec<_> = router
            .exchanges()
            .filter(|x| !x.name.is_empty() && !x.name.starts_with("amq."))
            .collect();
        xs.sort_by(|a, b| a.name.cmp(&b.name));
        for x in xs {
            exchanges.push(json!({
                "name": x.name.as_str(),
                "vhost": v.name(),
                "type": x.kind.as_str(),
                "durable": x.durable,
                "auto_delete": x.auto_delete,
                "internal": x.internal,
                "arguments": table_to_json(&x.arguments),
            }));
        }
        let exported_exchange =
            |name: &str| name.starts_with("amq.") || router.exchange(name).is_some();
        for b in router.bindings() {
            let (destination, kind, durable) = match &b.destination {
                exchange::Destination::Queue(q) => (
                    q.as_str().to_owned(),
                    "queue",
                    listed.iter().any(|(name, _, _, _)| *name == q),
                ),
                exchange::Destination::Exchange(x) => {
                    (x.as_str().to_owned(), "exchange", exported_exchange(x))
                }
            };
            if durable && exported_exchange(&b.source) {
                bindings.push(json!({
                    "source": b.source.as_str(),
                    "vhost": v.name(),
                    "destination": destination,
                    "destination_type": kind,
                    "routing_key": b.routing_key.as_str(),
                    "arguments": table_to_json(&b.arguments),
                }));
            }
        }
    }
    json!({
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "rabbit_version": "3.10.0",
        "rabbitmq_version": "3.10.0",
        "users": users,
        "vhosts": vhosts.iter().map(|v| json!({"name": v.name(), "limits": [], "metadata": {"description": "", "tags": []}})).collect::<Vec<_>>(),
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "parameters": parameters,
        "global_parameters": [],
        "policies": policies,
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    })
}

/// The sections of a definitions document that belong to one vhost.
const VHOST_SECTIONS: [&str; 5] = ["parameters", "policies", "queues", "exchanges", "bindings"];

/// Vhost `vhost`'s definitions, as RabbitMQ exports one vhost's
/// (`GET /api/definitions/{vhost}`): its parameters, policies, queues,
/// exchanges and bindings, without their `vhost` field.
pub fn export_vhost(broker: &Broker, vhost: &str) -> Value {
    let all = export(broker);
    let mut out = Map::new();
    for key in [
        "rabbit_version",
        "rabbitmq_version",
        "product_name",
        "product_version",
    ] {
        if let Some(v) = all.get(key) {
            out.insert(key.to_owned(), v.clone());
        }
    }
    for key in VHOST_SECTIONS {
        let items: Vec<Value> = all
            .get(key)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter(|i| i.get("vhost").and_then(Value::as_str) == Some(vhost))
                    .map(|i| {
                        let mut i = i.clone();
                        if let Some(m) = i.as_object_mut() {
                            m.remove("vhost");
                        }
                        i
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.insert(key.to_owned(), Value::Array(items));
    }
    Value::Object(out)
}

/// Applies a document of one vhost's definitions to vhost `vhost`
/// (`POST /api/definitions/{vhost}`): its vhost-scoped sections, each item
/// placed in `vhost` whatever vhost it names; users, vhosts and
/// permissions are not imported this way (as RabbitMQ).
pub async fn import_vhost(
    broker: &Arc<Broker>,
    vhost: &str,
    defs: &Value,
) -> Result<Imported, ImportError> {
    let defs = defs
        .as_object()
        .ok_or_else(|| ImportError::Malformed("not a JSON object".into()))?;
    let mut scoped = Map::new();
    for key in VHOST_SECTIONS {
        let items: Vec<Value> = section(defs, key)?
            .iter()
            .map(|i| {
                let mut i = i.clone();
                if let Some(m) = i.as_object_mut() {
                    m.insert("vhost".to_owned(), Value::String(vhost.to_owned()));
                }
                i
            })
            .collect();
        scoped.insert(key.to_owned(), Value::Array(items));
    }
    import(broker, &Value::Object(scoped)).await
}

fn section<'a>(defs: &'a Map<String, Value>, key: &str) -> Result<&'a [Value], ImportError> {
    match defs.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(ImportError::Malformed(format!("'{key}' must be a list"))),
    }
}

fn text<'a>(entry: &'a Value, key: &str, what: &str) -> Result<&'a str, ImportError> {
    entry
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| ImportError::Malformed(format!("{what}: missing '{key}'")))
}

fn flag(entry: &Value, key: &str, default: bool) -> bool {
    entry.get(key).and_then(Value::as_bool).unwrap_or(default)
}

fn short(s: &str) -> Result<ShortStr, ImportError> {
    ShortStr::try_from(s).map_err(|_| ImportError::Malformed(format!("name too long: {s}")))
}

fn arguments(entry: &Value) -> Result<amqp_codec::FieldTable, ImportError> {
    json_to_table(entry.get("arguments").unwrap_or(&Value::Null)).map_err(ImportError::Malformed)
}

/// Tags as RabbitMQ writes them: a list (3.9+) or a comma-separated string.
fn tags(entry: &Value) -> Vec<String> {
    match entry.get("tags") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// Applies a definitions document.
pub async fn import(broker: &Arc<Broker>, defs: &Value) -> Result<Imported, ImportError> {
    let defs = defs
        .as_object()
        .ok_or_else(|| ImportError::Malformed("not a JSON object".into()))?;
    let mut done = Imported::default();
    for v in section(defs, "vhosts")? {
        broker.add_vhost(text(v, "name", "vhost")?).await?;
        done.applied += 1;
    }
    // Vhost limits are applied last, so that a limit below what the file
    // itself declares (an export may hold one) does not stop the import.
    let mut vhost_limits = Vec::new();
    let mut operator_policies = Vec::new();
    for entry in section(defs, "parameters")? {
        let name = entry.get("name").and_then(Value::as_str).unwrap_or("?");
        match entry.get("component").and_then(Value::as_str) {
            Some(VHOST_LIMITS) => {}
            // Applied with the policies, once the vhosts exist.
            Some(OPERATOR_POLICY) => {
                operator_policies.push(entry);
                continue;
            }
            _ => {
                tracing::warn!(
                    name,
                    "definitions: runtime parameters other than vhost limits and operator policies are not supported yet, skipped"
                );
                done.skipped.push(format!("parameters: {name}"));
                continue;
            }
        }
        let vhost = text(entry, "vhost", "vhost limits")?;
        let limits = limits_from_json(entry.get("value").unwrap_or(&Value::Null))
            .map_err(|e| ImportError::Malformed(format!("vhost '{vhost}': {e}")))?;
        vhost_limits.push((vhost, limits));
    }
    for u in section(defs, "users")? {
        let name = text(u, "name", "user")?;
        let algorithm = u
            .get("hashing_algorithm")
            .and_then(Value::as_str)
            .unwrap_or("rabbit_password_hashing_sha256");
        if algorithm != "rabbit_password_hashing_sha256" {
            return Err(ImportError::Malformed(format!(
                "user '{name}': hashing algorithm {algorithm} is not supported (only rabbit_password_hashing_sha256)"
            )));
        }
        let hash = u
            .get("password_hash")
            .and_then(Value::as_str)
            .filter(|h| !h.is_empty())
            .map(str::to_owned);
        broker
            .put_user(crate::auth::User {
                name: name.to_owned(),
                password_hash: hash,
                tags: tags(u),
            })
            .await?;
        done.applied += 1;
    }
    for p in section(defs, "permissions")? {
        let (user, vhost) = (
            text(p, "user", "permission")?,
            text(p, "vhost", "permission")?,
        );
        broker
            .set_permissions(
                user,
                vhost,
                text(p, "configure", "permission")?,
                text(p, "write", "permission")?,
                text(p, "read", "permission")?,
            )
            .await
            .map_err(|e| {
                ImportError::Malformed(format!("permission of '{user}' in '{vhost}': {e}"))
            })?;
        done.applied += 1;
    }
    for p in section(defs, "topic_permissions")? {
        broker
            .set_topic_permissions(
                text(p, "user", "topic permission")?,
                text(p, "vhost", "topic permission")?,
                text(p, "exchange", "topic permission")?,
                text(p, "write", "topic permission")?,
                text(p, "read", "topic permission")?,
            )
            .await?;
        done.applied += 1;
    }
    for x in section(defs, "exchanges")? {
        let vhost = vhost_of(broker, x, "exchange")?;
        let args = arguments(x)?;
        let decl = exchange::ExchangeDeclare {
            name: text(x, "name", "exchange")?,
            kind: text(x, "type", "exchange")?,
            durable: flag(x, "durable", true),
            auto_delete: flag(x, "auto_delete", false),
            internal: flag(x, "internal", false),
            arguments: &args,
        };
        vhost.declare_exchange(decl, false).await?;
        done.applied += 1;
    }
    // Policies (and operator policies) before queues, as RabbitMQ imports
    // them: a queue a mirroring policy (`ha-mode`) matches is declared
    // replicated, and one an operator policy caps is capped from the start.
    let operator = operator_policies.into_iter().map(|entry| {
        let value = entry.get("value").unwrap_or(&Value::Null);
        (
            crate::policy::PolicyKind::Operator,
            entry.get("vhost").unwrap_or(&Value::Null),
            entry.get("name").unwrap_or(&Value::Null),
            value,
        )
    });
    let user = section(defs, "policies")?.iter().map(|p| {
        (
            crate::policy::PolicyKind::User,
            p.get("vhost").unwrap_or(&Value::Null),
            p.get("name").unwrap_or(&Value::Null),
            p,
        )
    });
    for (kind, vhost, name, p) in user.chain(operator) {
        let what = kind.noun();
        let definition = match p.get("definition") {
            Some(Value::Object(d)) => d.clone(),
            _ => {
                return Err(ImportError::Malformed(format!(
                    "{what}: missing 'definition'"
                )));
            }
        };
        let name = name
            .as_str()
            .ok_or_else(|| ImportError::Malformed(format!("{what}: missing 'name'")))?;
        let vhost = vhost
            .as_str()
            .ok_or_else(|| ImportError::Malformed(format!("{what} '{name}': missing 'vhost'")))?;
        let apply_to = p.get("apply-to").and_then(Value::as_str).unwrap_or("all");
        let policy = crate::policy::Policy::of_kind(
            kind,
            vhost,
            name,
            text(p, "pattern", what)?,
            crate::policy::ApplyTo::parse(apply_to).ok_or_else(|| {
                ImportError::Malformed(format!("{what} '{name}': apply-to '{apply_to}'"))
            })?,
            p.get("priority").and_then(Value::as_i64).unwrap_or(0),
            definition,
        )
        .map_err(|e| ImportError::Malformed(format!("{what} '{name}': {e}")))?;
        if broker.set_policy(policy).await?.is_none() {
            return Err(ImportError::Malformed(format!(
                "{what} '{name}': no such vhost"
            )));
        }
        done.applied += 1;
    }
    for q in section(defs, "queues")? {
        let vhost = vhost_of(broker, q, "queue")?;
        let name = text(q, "name", "queue")?;
        vhost
            .declare_or_check_queue(
                short(name)?,
                flag(q, "durable", true),
                flag(q, "auto_delete", false),
                arguments(q)?,
            )
            .await?;
        done.applied += 1;
    }
    for b in section(defs, "bindings")? {
        let vhost = vhost_of(broker, b, "binding")?;
        let destination = short(text(b, "destination", "binding")?)?;
        let destination = match text(b, "destination_type", "binding")? {
            "queue" => exchange::Destination::Queue(destination),
            "exchange" => exchange::Destination::Exchange(destination),
            other => {
                return Err(ImportError::Malformed(format!(
                    "binding: destination_type '{other}'"
                )));
            }
        };
        let def = exchange::BindingDef {
            source: short(text(b, "source", "binding")?)?,
            destination,
            routing_key: short(b.get("routing_key").and_then(Value::as_str).unwrap_or(""))?,
            arguments: arguments(b)?,
        };
        if def.source.is_empty() {
            continue; // the default exchange's bindings are implicit
        }
        vhost.bind(&def).await?;
        done.applied += 1;
    }
    for (vhost, limits) in vhost_limits {
        if broker.vhost(vhost).is_none() {
            broker.add_vhost(vhost).await?;
        }
        broker.set_vhost_limits(vhost, limits).await?;
        done.applied += 1;
    }
    tracing::info!(
        applied = done.applied,
        skipped = done.skipped.len(),
        "definitions imported"
    );
    Ok(done)
}

fn vhost_of(
    broker: &Broker,
    entry: &Value,
    what: &str,
) -> Result<Arc<crate::vhost::Vhost>, ImportError> {
    let name = text(entry, "vhost", what)?;
    broker
        .vhost(name)
        .ok_or_else(|| ImportError::Malformed(format!("{what}: no vhost '{name}'")))
}
