//! The management API's routes and handlers, in RabbitMQ's shapes: GET lists
//! and single objects, PUT creates (201) or leaves an existing equivalent
//! object alone (204), DELETE answers 204, a missing object 404.

use std::sync::Arc;

use amqp_codec::ShortStr;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use queue_store::QueueArgs;
use serde_json::{Map, Value, json};

use super::listing::{ListQuery, respond};
use super::{ApiError, Caller};
use crate::auth::{Access, Resource};
use crate::broker::Broker;
use crate::json::{binding, exchange, flag, json_to_table, names_binding, properties_key, queue};
use crate::policy::{Policy, PolicyKind};
use crate::vhost::Vhost;

type Shared = State<Arc<Broker>>;
type ApiResult = Result<Response, ApiError>;
type Body = Option<Json<Map<String, Value>>>;
type Listing = Query<ListQuery>;

/// A listing of already rendered objects, filtered by their `name`.
fn listing(query: &ListQuery, items: Vec<Value>) -> ApiResult {
    // Items without a name (permissions, vhost limits) filter on their
    // user, else their vhost.
    respond(
        query,
        items,
        |v| {
            std::borrow::Cow::Borrowed(
                ["name", "user", "vhost"]
                    .iter()
                    .find_map(|k| v.get(*k).and_then(Value::as_str))
                    .unwrap_or(""),
            )
        },
        Value::clone,
    )
}

/// Every route of the API.
pub(super) fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/api/overview", get(overview))
        .route("/api/whoami", get(whoami))
        .route("/api/vhosts", get(list_vhosts))
        .route(
            "/api/vhosts/{vhost}",
            get(get_vhost).put(put_vhost).delete(delete_vhost),
        )
        .route("/api/users", get(list_users))
        .route(
            "/api/users/{user}",
            get(get_user).put(put_user).delete(delete_user),
        )
        .route("/api/permissions", get(list_permissions))
        .route(
            "/api/permissions/{vhost}/{user}",
            get(get_permission)
                .put(put_permission)
                .delete(delete_permission),
        )
        .route("/api/queues", get(list_all_queues))
        .route("/api/queues/{vhost}", get(list_queues))
        .route(
            "/api/queues/{vhost}/{name}",
            get(get_queue).put(put_queue).delete(delete_queue),
        )
        .route("/api/queues/{vhost}/{name}/contents", delete(purge_queue))
        // RabbitMQ 4's paths for rabbitmq-queues add_member / delete_member.
        .route(
            "/api/queues/quorum/{vhost}/{name}/replicas/add",
            post(add_replica),
        )
        .route(
            "/api/queues/quorum/{vhost}/{name}/replicas/delete",
            delete(delete_replica),
        )
        // Warren's own, beside those: rabbitmq-queues quorum_status.
        .route(
            "/api/queues/quorum/{vhost}/{name}/status",
            get(quorum_status),
        )
        .route("/api/queues/{vhost}/{name}/get", post(get_messages))
        .route(
            "/api/exchanges/{vhost}/{name}/publish",
            post(publish_message),
        )
        .route("/api/exchanges/{vhost}/{name}/route", post(trace_route))
        .route("/api/aliveness-test/{vhost}", get(aliveness_test))
        .route("/api/exchanges", get(list_all_exchanges))
        .route("/api/exchanges/{vhost}", get(list_exchanges))
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(get_exchange).put(put_exchange).delete(delete_exchange),
        )
        .route("/api/bindings", get(list_all_bindings))
        .route("/api/bindings/{vhost}", get(list_bindings))
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{destination}",
            post(bind).get(list_pair_bindings),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{destination}/{props}",
            get(get_binding).delete(unbind),
        )
        .route("/api/nodes", get(list_nodes))
        .route("/api/cluster-name", get(cluster_name))
        .route("/api/cluster/nodes/{name}", delete(forget_node))
        .route("/api/cluster/join", post(join_cluster))
        .route("/api/nodes/{name}", get(get_node))
        .route(
            "/api/nodes/{name}/vm_memory_high_watermark",
            put(put_memory_watermark),
        )
        .route(
            "/api/nodes/{name}/disk_free_limit",
            put(put_disk_free_limit),
        )
        .route("/api/vhosts/{vhost}/permissions", get(vhost_permissions))
        .route("/api/users/{user}/permissions", get(user_permissions))
        .route("/api/policies", get(list_all_policies))
        .route("/api/policies/{vhost}", get(list_policies))
        .route(
            "/api/policies/{vhost}/{name}",
            get(get_policy).put(put_policy).delete(delete_policy),
        )
        .route("/api/vhost-limits", get(list_all_vhost_limits))
        .route("/api/vhost-limits/{vhost}", get(list_vhost_limits))
        .route(
            "/api/vhost-limits/{vhost}/{name}",
            axum::routing::put(put_vhost_limit).delete(delete_vhost_limit),
        )
        .route("/api/connections", get(list_connections))
        .route(
            "/api/connections/{name}",
            get(get_connection).delete(close_connection),
        )
        .route("/api/channels", get(list_channels))
        .route("/api/consumers", get(list_consumers))
        .route(
            "/api/definitions",
            get(export_definitions).post(import_definitions),
        )
        .route(
            "/api/definitions/{vhost}",
            get(export_vhost_definitions).post(import_vhost_definitions),
        )
        .route("/api/health/checks/alarms", get(alarms))
        .route("/api/health/checks/virtual-hosts", get(virtual_hosts_check))
        .route(
            "/api/health/checks/port-listener/{port}",
            get(port_listener_check),
        )
        .route(
            "/api/health/checks/protocol-listener/{protocol}",
            get(protocol_listener_check),
        )
        .route("/api/extensions", get(extensions))
        .route("/api/auth", get(auth_settings))
        .route("/api/feature-flags", get(feature_flags))
        .route("/api/global-parameters", get(global_parameters))
        .route("/api/global-parameters/{name}", get(global_parameter))
        .route("/api/parameters", get(no_parameters))
        .route("/api/parameters/{component}", get(no_parameters))
        .route("/api/parameters/{component}/{vhost}", get(no_parameters))
        .route(
            "/api/parameters/{component}/{vhost}/{name}",
            get(no_parameter)
                .put(unknown_component)
                .delete(no_parameter),
        )
        .route("/api/operator-policies", get(list_all_operator_policies))
        .route(
            "/api/operator-policies/{vhost}",
            get(list_operator_policies),
        )
        .route(
            "/api/operator-policies/{vhost}/{name}",
            get(get_operator_policy)
                .put(put_operator_policy)
                .delete(delete_operator_policy),
        )
        .route("/api/topic-permissions", get(list_topic_permissions))
        .route(
            "/api/topic-permissions/{vhost}/{user}",
            get(get_topic_permissions)
                .put(put_topic_permissions)
                .delete(delete_topic_permissions),
        )
        .route(
            "/api/vhosts/{vhost}/topic-permissions",
            get(vhost_topic_permissions),
        )
        .route(
            "/api/users/{user}/topic-permissions",
            get(user_topic_permissions),
        )
        .route("/api/vhosts/{vhost}/connections", get(vhost_connections))
        .route("/api/vhosts/{vhost}/channels", get(vhost_channels))
        .route("/api/connections/{name}/channels", get(connection_channels))
        .route("/api/channels/{name}", get(get_channel))
        .route("/api/queues/{vhost}/{name}/bindings", get(queue_bindings))
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/source",
            get(exchange_bindings_source),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/destination",
            get(exchange_bindings_destination),
        )
        .route("/api/health/checks/local-alarms", get(alarms))
        .route(
            "/api/health/checks/node-is-quorum-critical",
            get(node_is_quorum_critical),
        )
        // The web UI at `/`.
        .merge(super::ui::routes())
        // RabbitMQ's JSON 404 for a path it does not serve.
        .fallback(|| async { ApiError::not_found() })
        .layer(axum::middleware::from_fn(
            super::ui::no_challenge_for_the_page,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(20 << 20))
        .with_state(broker)
}

fn ok(v: Value) -> ApiResult {
    Ok(Json(v).into_response())
}

fn created(was_new: bool) -> ApiResult {
    Ok(if was_new {
        StatusCode::CREATED
    } else {
        StatusCode::NO_CONTENT
    }
    .into_response())
}

fn no_content() -> ApiResult {
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn visible_vhost(broker: &Broker, caller: &Caller, name: &str) -> Result<Arc<Vhost>, ApiError> {
    match broker.vhost(name) {
        Some(v) if caller.may_see(broker, name) => Ok(v),
        _ => Err(ApiError::not_found()),
    }
}

fn visible_vhosts(broker: &Broker, caller: &Caller) -> Vec<Arc<Vhost>> {
    let mut v: Vec<_> = broker
        .vhost_list()
        .into_iter()
        .filter(|v| caller.may_see(broker, v.name()))
        .collect();
    v.sort_by(|a, b| a.name().cmp(b.name()));
    v
}

fn body_map(body: Body) -> Map<String, Value> {
    body.map(|Json(m)| m).unwrap_or_default()
}

/// A name as AMQP carries it: at most 255 octets (400 otherwise, with the
/// name cut short in the reason).
fn short(s: &str) -> Result<ShortStr, ApiError> {
    ShortStr::try_from(s).map_err(|_| {
        let head: String = s.chars().take(32).collect();
        ApiError::bad_request(format!(
            "name too long: {} octets, at most 255 ('{head}...')",
            s.len()
        ))
    })
}

async fn overview(State(b): Shared, caller: Caller) -> ApiResult {
    let vhosts = visible_vhosts(&b, &caller);
    let (mut queues, mut ready, mut unacked, mut consumers, mut exchanges) = (0, 0, 0, 0, 0);
    let (mut counts, mut rates) = ([0u64; 3], [0f64; 3]);
    let mut depth_rates = [0f64; 3];
    for v in &vhosts {
        exchanges += v.router.read().exchanges().count();
        for q in v.queues() {
            let (c, r) = q.stats.snapshot();
            add_up(&mut counts, &mut rates, c, r);
            for (sum, r) in depth_rates.iter_mut().zip(q.stats.depth_rates()) {
                *sum += r;
            }
            let counts = q.counters();
            queues += 1;
            ready += counts.ready;
            unacked += counts.unacked;
            consumers += counts.consumers;
        }
    }
    // The node's own counters (with their rates) beside the queues' sums.
    let mut message_stats = crate::json::message_stats((counts, rates));
    let mut churn = Map::new();
    for (name, count, rate) in b.metrics.overview_stats() {
        let (target, key) = match name.strip_prefix("churn.") {
            Some(key) => (&mut churn, key),
            None => match message_stats.as_object_mut() {
                Some(m) => (m, name),
                None => continue,
            },
        };
        target.insert(key.to_owned(), json!(count));
        target.insert(format!("{key}_details"), json!({"rate": rate}));
    }
    // Messages the store read back and wrote (this node's).
    if let Some(m) = message_stats.as_object_mut() {
        let (io, io_rates) = b.disk_io_stats();
        for (i, key) in ["disk_reads", "disk_writes"].into_iter().enumerate() {
            m.insert(key.to_owned(), json!(io[i]));
            m.insert(format!("{key}_details"), json!({"rate": io_rates[i]}));
        }
    }
    ok(json!({
        "management_version": env!("CARGO_PKG_VERSION"),
        "rabbitmq_version": "3.10.0",
        // Not Erlang: "none", as rabbitmq_build_info says.
        "erlang_version": "none",
        "erlang_full_version": "none",
        "release_series_support_status": "supported",
        // Rates are sampled every 5 s and not kept: RabbitMQ's "basic".
        "rates_mode": "basic",
        "disable_stats": false,
        "enable_queue_totals": false,
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "cluster_name": b.peers.get().map_or_else(|| b.config.node_name.clone(), |p| p.cluster_name()),
        "node": b.config.node_name,
        "object_totals": {
            "connections": b.connections.load(std::sync::atomic::Ordering::Relaxed),
            "channels": super::local_listing(&b, crate::peers::Listing::Channels).len(),
            "queues": queues,
            "exchanges": exchanges,
            "consumers": consumers,
        },
        "exchange_types": exchange_types(),
        "queue_totals": {
            "messages": ready + unacked,
            "messages_ready": ready,
            "messages_unacknowledged": unacked,
            "messages_details": {"rate": depth_rates[0]},
            "messages_ready_details": {"rate": depth_rates[1]},
            "messages_unacknowledged_details": {"rate": depth_rates[2]},
        },
        "message_stats": message_stats,
        "churn_rates": churn,
        "listeners": listeners(&b),
    }))
}

/// The exchange types this broker has, as `/api/overview` lists them.
fn exchange_types() -> Value {
    json!([
        {"name": "direct", "description": "AMQP direct exchange, as per the AMQP specification", "enabled": true},
        {"name": "fanout", "description": "AMQP fanout exchange, as per the AMQP specification", "enabled": true},
        {"name": "headers", "description": "AMQP headers exchange, as per the AMQP specification", "enabled": true},
        {"name": "topic", "description": "AMQP topic exchange, as per the AMQP specification", "enabled": true},
    ])
}

/// Every node's AMQP listener (this node's, alone).
/// The overview's `listeners`: every listener this node bound (AMQP, AMQPS,
/// HTTP, Prometheus, under RabbitMQ's protocol names) and, in a cluster,
/// the other members' AMQP listeners as they gossip them.
fn listeners(b: &Broker) -> Value {
    let me = &b.config.node_name;
    let mut out: Vec<Value> = b
        .listeners
        .get()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|(protocol, addr)| {
            json!({"node": me, "protocol": protocol, "ip_address": addr.ip().to_string(), "port": addr.port()})
        })
        .collect();
    if let Some(peers) = b.peers.get() {
        for m in peers.members().iter().filter(|m| &m.name != me) {
            let (ip, port) = m
                .amqp_addr
                .rsplit_once(':')
                .unwrap_or((&m.amqp_addr, "5672"));
            out.push(json!({"node": m.name, "protocol": "amqp", "ip_address": ip, "port": port.parse::<u16>().unwrap_or(5672)}));
        }
    }
    Value::Array(out)
}

async fn whoami(caller: Caller, State(b): Shared) -> ApiResult {
    let tags = b
        .auth
        .user(&caller.name)
        .map(|u| u.tags)
        .unwrap_or_default();
    ok(json!({"name": caller.name, "tags": tags}))
}

fn vhost_json(b: &Broker, v: &Vhost) -> Value {
    let (mut ready, mut unacked) = (0, 0);
    let mut rates = [0.0; 3];
    // Its queues' message counts and rates, summed (publish, deliver_get,
    // ack; deliveries by kind).
    let (mut counts, mut count_rates) = ([0u64; 3], [0f64; 3]);
    let (mut kinds, mut kind_rates) = ([0u64; 6], [0f64; 6]);
    for q in v.queues() {
        let c = q.counters();
        ready += c.ready;
        unacked += c.unacked;
        for (sum, r) in rates.iter_mut().zip(q.stats.depth_rates()) {
            *sum += r;
        }
        let (qc, qr) = q.stats.snapshot();
        let (kc, kr) = q.stats.kinds.snapshot();
        add_up(&mut counts, &mut count_rates, qc, qr);
        add_up(&mut kinds, &mut kind_rates, kc, kr);
    }
    // Its connections' traffic on this node, and its rates.
    let (mut octets, mut octet_rates) = ([0; 2], [0.0; 2]);
    for c in b.live_connections.iter().filter(|c| c.vhost == v.name()) {
        add_up(
            &mut octets,
            &mut octet_rates,
            c.octets(),
            c.octet_rates.rates(),
        );
    }
    let mut out = json!({
        "name": v.name(),
        "description": "",
        "tags": [],
        "metadata": {"description": "", "tags": []},
        "default_queue_type": "undefined",
        "cluster_state": {b.config.node_name.clone(): if b.store.failure().is_some() { "stopped" } else { "running" }},
        "tracing": v.tracer.is_on(),
        "messages": ready + unacked,
        "messages_ready": ready,
        "messages_unacknowledged": unacked,
        "messages_details": {"rate": rates[0]},
        "messages_ready_details": {"rate": rates[1]},
        "messages_unacknowledged_details": {"rate": rates[2]},
        "recv_oct": octets[0],
        "recv_oct_details": {"rate": octet_rates[0]},
        "send_oct": octets[1],
        "send_oct_details": {"rate": octet_rates[1]},
    });
    // As RabbitMQ, only once something happened in it.
    if counts.iter().chain(&kinds).any(|n| *n > 0) {
        let mut stats = crate::json::message_stats((counts, count_rates));
        if let Some(m) = stats.as_object_mut() {
            for (i, name) in crate::queue::DELIVERY_KINDS.iter().enumerate() {
                m.insert((*name).to_owned(), json!(kinds[i]));
                m.insert(format!("{name}_details"), json!({"rate": kind_rates[i]}));
            }
        }
        out["message_stats"] = stats;
    }
    out
}

/// Adds one object's counts and rates to running sums.
fn add_up<const N: usize>(
    counts: &mut [u64; N],
    rates: &mut [f64; N],
    more: [u64; N],
    more_rates: [f64; N],
) {
    for i in 0..N {
        counts[i] += more[i];
        rates[i] += more_rates[i];
    }
}

async fn list_vhosts(State(b): Shared, caller: Caller, Query(q): Listing) -> ApiResult {
    let vhosts = visible_vhosts(&b, &caller);
    respond(
        &q,
        vhosts,
        |v| std::borrow::Cow::Borrowed(v.name()),
        |v| vhost_json(&b, v),
    )
}

async fn get_vhost(State(b): Shared, caller: Caller, Path(name): Path<String>) -> ApiResult {
    let v = visible_vhost(&b, &caller, &name)?;
    ok(vhost_json(&b, &v))
}

/// Creates a vhost; `{"tracing": true|false}` turns its firehose on or off
/// (as RabbitMQ's API, and `warrenctl trace_on/trace_off`). Tracing is not
/// persisted: a restart turns it off, as in RabbitMQ.
async fn put_vhost(
    State(b): Shared,
    caller: Caller,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult {
    caller.require_admin()?;
    short(&name)?;
    let body = body_map(body);
    let tracing = match body.get("tracing") {
        None => None,
        Some(Value::Bool(on)) => Some(*on),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "tracing must be true or false, not {other}"
            )));
        }
    };
    let was_new = b.vhost(&name).is_none();
    let v = b.add_vhost(&name).await?;
    if was_new {
        // As RabbitMQ's API: whoever creates a vhost gets full
        // permissions on it.
        b.set_permissions(&caller.name, &name, ".*", ".*", ".*")
            .await?;
    }
    if let Some(on) = tracing {
        v.tracer.set(on);
        tracing::info!(vhost = %name, on, "tracing");
    }
    created(was_new)
}

async fn delete_vhost(State(b): Shared, caller: Caller, Path(name): Path<String>) -> ApiResult {
    caller.require_admin()?;
    if b.vhost(&name).is_none() {
        return Err(ApiError::not_found());
    }
    b.delete_vhost(&name).await?;
    no_content()
}

async fn list_users(State(b): Shared, caller: Caller, Query(q): Listing) -> ApiResult {
    caller.require_admin()?;
    let mut users = b.auth.users();
    users.sort_by(|a, c| a.name.cmp(&c.name));
    respond(
        &q,
        users,
        |u| std::borrow::Cow::Borrowed(u.name.as_str()),
        crate::json::user,
    )
}

async fn get_user(State(b): Shared, caller: Caller, Path(name): Path<String>) -> ApiResult {
    caller.require_admin()?;
    let u = b.auth.user(&name).ok_or_else(ApiError::not_found)?;
    ok(crate::json::user(&u))
}

/// `tags` as RabbitMQ accepts it: a comma-separated string or a list.
fn tags_of(body: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    match body.get("tags") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::bad_request("tags must be strings"))
            })
            .collect(),
        Some(_) => Err(ApiError::bad_request("tags must be a string or a list")),
    }
}

async fn put_user(
    State(b): Shared,
    caller: Caller,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult {
    caller.require_admin()?;
    short(&name)?;
    let body = body_map(body);
    let tags = tags_of(&body)?;
    let existing = b.auth.user(&name);
    let password_hash = match (body.get("password"), body.get("password_hash")) {
        (Some(Value::String(p)), _) => Some(crate::auth::hash_password(p)),
        (_, Some(Value::String(h))) if h.is_empty() => None,
        (_, Some(Value::String(h))) => Some(h.clone()),
        (None, None) => match &existing {
            Some(u) => u.password_hash.clone(),
            None => {
                return Err(ApiError::bad_request(
                    "Mandatory fields missing: password or password_hash",
                ));
            }
        },
        _ => return Err(ApiError::bad_request("password must be a string")),
    };
    b.put_user(crate::auth::User {
        name: name.clone(),
        password_hash,
        tags,
    })
    .await?;
    created(existing.is_none())
}

async fn delete_user(State(b): Shared, caller: Caller, Path(name): Path<String>) -> ApiResult {
    caller.require_admin()?;
    if b.auth.user(&name).is_none() {
        return Err(ApiError::not_found());
    }
    b.delete_user(&name).await?;
    no_content()
}

fn permission_json(p: &crate::auth::PermissionView) -> Value {
    json!({
        "user": p.user,
        "vhost": p.vhost,
        "configure": p.configure,
        "write": p.write,
        "read": p.read,
    })
}

async fn list_permissions(State(b): Shared, caller: Caller, Query(q): Listing) -> ApiResult {
    caller.require_admin()?;
    listing(
        &q,
        b.auth.permissions().iter().map(permission_json).collect(),
    )
}

async fn get_permission(
    State(b): Shared,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    let p = b
        .auth
        .permissions()
        .into_iter()
        .find(|p| p.vhost == vhost && p.user == user)
        .ok_or_else(ApiError::not_found)?;
    ok(permission_json(&p))
}

async fn put_permission(
    State(b): Shared,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    caller.require_admin()?;
    if b.vhost(&vhost).is_none() || b.auth.user(&user).is_none() {
        return Err(ApiError::not_found());
    }
    let body = body_map(body);
    let field = |k: &str| -> Result<String, ApiError> {
        match body.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(ApiError::bad_request(format!(
                "Mandatory fields missing: {k}"
            ))),
        }
    };
    let (c, w, r) = (field("configure")?, field("write")?, field("read")?);
    created(b.set_permissions(&user, &vhost, &c, &w, &r).await?)
}

async fn delete_permission(
    State(b): Shared,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    if !b
        .auth
        .permissions()
        .iter()
        .any(|p| p.vhost == vhost && p.user == user)
    {
        return Err(ApiError::not_found());
    }
    b.clear_permissions(&user, &vhost).await?;
    no_content()
}

/// One listing over every vhost the caller may see, in vhost order.
fn across_vhosts(
    b: &Broker,
    caller: &Caller,
    query: &ListQuery,
    each: fn(&Vhost) -> Vec<Value>,
) -> ApiResult {
    listing(
        query,
        visible_vhosts(b, caller)
            .iter()
            .flat_map(|v| each(v))
            .collect(),
    )
}

/// Queues are listed from their handles, each rendered only if the answer
/// holds it (a page of a 50,000-queue broker renders one page).
/// A queue in a listing: this node's, or another node's as it answered.
enum Listed {
    Local(Arc<Vhost>, Arc<crate::queue::QueueHandle>),
    Remote(Value),
}

/// This node's own queues, in every vhost.
pub(super) fn local_queues(b: &Broker) -> Vec<Value> {
    b.vhost_list()
        .iter()
        .flat_map(|v| {
            v.queues()
                .into_iter()
                .map(|q| queue(v.name(), &q, &b.config.node_name))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// How long a listing waits for another node's queues.
const PEER_LISTING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// What each of `nodes` lists of its own `what`, asked at once, each
/// answer within `PEER_LISTING_TIMEOUT`; in the order of `nodes`.
async fn ask_nodes(
    peers: &dyn crate::peers::Peers,
    nodes: &[String],
    what: crate::peers::Listing,
) -> Vec<Result<Vec<Value>, String>> {
    futures_util::future::join_all(nodes.iter().map(|n| {
        let listing = peers.list_on(n, what);
        async move {
            tokio::time::timeout(PEER_LISTING_TIMEOUT, listing)
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r)
                .and_then(|text| {
                    serde_json::from_str::<Vec<Value>>(&text).map_err(|e| e.to_string())
                })
        }
    }))
    .await
}

/// The queues of `vhosts` that live on other nodes, as their nodes list
/// them; a queue whose node does not answer is listed with state `down`,
/// as RabbitMQ lists it.
async fn remote_queues(b: &Broker, vhosts: &[Arc<Vhost>]) -> Vec<Value> {
    let Some(peers) = b.peers.get() else {
        return Vec::new();
    };
    let wanted: Vec<(String, crate::peers::RemoteQueue)> = vhosts
        .iter()
        .flat_map(|v| {
            v.remote_queues()
                .into_iter()
                .map(|q| (v.name().to_owned(), q))
                .collect::<Vec<_>>()
        })
        .collect();
    let (replicated, wanted): (Vec<_>, Vec<_>) =
        wanted.into_iter().partition(|(_, q)| q.replicated());
    let mut listed = replicated_queues(peers.as_ref(), replicated).await;
    // The policies that apply to them, as to a local queue.
    for entry in &mut listed {
        let (Some(vhost), Some(name)) = (entry["vhost"].as_str(), entry["name"].as_str()) else {
            continue;
        };
        let Some(v) = vhosts.iter().find(|v| v.name() == vhost) else {
            continue;
        };
        let Some(q) = v.find_remote_queue(name) else {
            continue;
        };
        let applied = v.policies_of_replicated(&q);
        entry["policy"] = json!(applied.policy);
        entry["operator_policy"] = json!(applied.operator_policy);
        entry["effective_policy_definition"] = Value::Object(applied.definition);
    }
    let mut homes: Vec<String> = wanted.iter().map(|(_, q)| q.home.clone()).collect();
    homes.sort();
    homes.dedup();
    let answers = ask_nodes(peers.as_ref(), &homes, crate::peers::Listing::Queues).await;
    let mut known: std::collections::HashMap<(String, String), Value> = Default::default();
    for (home, answer) in homes.iter().zip(answers) {
        match answer {
            Ok(list) => {
                for q in list {
                    let key = (
                        q["vhost"].as_str().unwrap_or_default().to_owned(),
                        q["name"].as_str().unwrap_or_default().to_owned(),
                    );
                    known.insert(key, q);
                }
            }
            Err(e) => tracing::debug!(node = %home, error = %e, "listing another node's queues"),
        }
    }
    wanted
        .into_iter()
        .map(|(vhost, q)| {
            known
                .remove(&(vhost.clone(), q.name.to_string()))
                .unwrap_or_else(|| {
                    json!({"name": q.name.as_str(), "vhost": vhost, "durable": q.durable,
                        "auto_delete": false, "exclusive": q.exclusive, "type": "classic",
                        "node": q.home, "state": "down", "arguments": {}})
                })
        })
        .chain(listed.drain(..))
        .collect()
}

/// Replicated queues as RabbitMQ lists quorum queues: `node` is the leader,
/// with `leader`, `members` and `online`; one whose members do not answer
/// is listed with state `down`.
async fn replicated_queues(
    peers: &dyn crate::peers::Peers,
    queues: Vec<(String, crate::peers::RemoteQueue)>,
) -> Vec<Value> {
    let answers = futures_util::future::join_all(queues.iter().map(|(vhost, q)| {
        let status = peers.replica_status(vhost, &q.name);
        async move {
            tokio::time::timeout(PEER_LISTING_TIMEOUT, status)
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r)
        }
    }))
    .await;
    queues
        .into_iter()
        .zip(answers)
        .map(|((vhost, q), status)| {
            let arguments = crate::json::table_to_json(&q.arguments);
            // A classic queue a mirroring policy replicated is listed as
            // classic (with its members), as 3.x lists a mirrored one.
            let kind = match q
                .arguments
                .get("x-queue-type")
                .and_then(amqp_codec::FieldValue::as_str)
            {
                Some("quorum") => "quorum",
                _ => "classic",
            };
            match status {
                Ok(s) => json!({
                    "name": q.name.as_str(), "vhost": vhost, "durable": true,
                    "auto_delete": false, "exclusive": false, "arguments": arguments,
                    "type": kind, "state": if s.leader.is_some() { "running" } else { "minority" },
                    "node": s.leader.clone().unwrap_or_default(), "leader": s.leader,
                    "members": s.members, "online": s.online,
                    "messages": s.ready + s.unacked, "messages_ready": s.ready,
                    "messages_unacknowledged": s.unacked, "consumers": s.consumers,
                }),
                Err(e) => {
                    tracing::debug!(queue = %q.name, error = %e, "a replicated queue's status");
                    json!({
                        "name": q.name.as_str(), "vhost": vhost, "durable": true,
                        "auto_delete": false, "exclusive": false, "arguments": arguments,
                        "type": kind, "state": "down", "node": q.home,
                        "members": q.members, "online": [],
                    })
                }
            }
        })
        .collect()
}

async fn queue_listing(query: &ListQuery, b: &Broker, vhosts: &[Arc<Vhost>]) -> ApiResult {
    let mut items = Vec::new();
    for v in vhosts {
        items.extend(v.queues().into_iter().map(|q| Listed::Local(v.clone(), q)));
    }
    items.extend(
        remote_queues(b, vhosts)
            .await
            .into_iter()
            .map(Listed::Remote),
    );
    // RabbitMQ's default order: by vhost, then name.
    let key = |i: &Listed| match i {
        Listed::Local(v, q) => (v.name().to_owned(), q.name.to_string()),
        Listed::Remote(j) => (
            j["vhost"].as_str().unwrap_or_default().to_owned(),
            j["name"].as_str().unwrap_or_default().to_owned(),
        ),
    };
    items.sort_by_cached_key(key);
    let node = &b.config.node_name;
    respond(
        query,
        items,
        |i| match i {
            Listed::Local(_, q) => std::borrow::Cow::Borrowed(q.name.as_str()),
            Listed::Remote(j) => {
                std::borrow::Cow::Owned(j["name"].as_str().unwrap_or_default().to_owned())
            }
        },
        |i| match i {
            Listed::Local(v, q) => queue(v.name(), q, node),
            Listed::Remote(j) => j.clone(),
        },
    )
}

async fn list_all_queues(State(b): Shared, caller: Caller, Query(q): Listing) -> ApiResult {
    queue_listing(&q, &b, &visible_vhosts(&b, &caller)).await
}

async fn list_queues(
    State(b): Shared,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Listing,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    queue_listing(&q, &b, &[v]).await
}

async fn get_queue(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    if let Some(q) = v.find_queue(&name) {
        // One queue: with its consumers and the definition its policy
        // gives it, as RabbitMQ shows them.
        let mut out = queue(v.name(), &q, &b.config.node_name);
        out["consumer_details"] = Value::Array(queue_consumers(&v, &q, &b.config.node_name));
        return ok(out);
    }
    // A queue on another node, as its node lists it.
    let remote = v.find_remote_queue(&name).ok_or_else(ApiError::not_found)?;
    let mut listed = remote_queues(&b, &[v]).await;
    let i = listed
        .iter()
        .position(|j| j["name"] == remote.name.as_str())
        .ok_or_else(ApiError::not_found)?;
    ok(listed.swap_remove(i))
}

async fn put_queue(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    short(&name)?;
    caller.require_access(&b, &vhost, Resource::Queue, &name, Access::Configure)?;
    let body = body_map(body);
    if name.starts_with("amq.") {
        return Err(ApiError::bad_request(format!(
            "queue name '{name}' contains reserved prefix 'amq.*'"
        )));
    }
    let created = v
        .declare_or_check_queue(
            short(&name)?,
            flag(&body, "durable", true).map_err(ApiError::bad_request)?,
            flag(&body, "auto_delete", false).map_err(ApiError::bad_request)?,
            json_to_table(body.get("arguments").unwrap_or(&Value::Null))
                .map_err(ApiError::bad_request)?,
        )
        .await?;
    self::created(created)
}

async fn delete_queue(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    caller.require_access(&b, &vhost, Resource::Queue, &name, Access::Configure)?;
    let Some(q) = v.find_queue(&name) else {
        // On its home node (a replicated queue's leader), which commits
        // the deletion for every node, as `queue.delete` from a client.
        let (remote, peers) = on_another_node(&b, &v, &name)?;
        let done = peers
            .delete(&remote.home, v.name(), &remote.name, false, false)
            .await;
        remote.answered(done, v.name())?;
        return no_content();
    };
    not_exclusive(&q, &vhost)?;
    v.delete_queue(&q, false).await?;
    no_content()
}

/// Queue `name` when another node holds it (its home, or a replicated
/// queue's leader), with the way to reach it; 404 when no node does, and
/// RabbitMQ's 405 for another connection's exclusive queue.
fn on_another_node<'a>(
    b: &'a Broker,
    v: &Vhost,
    name: &str,
) -> Result<(crate::peers::RemoteQueue, &'a Arc<dyn crate::peers::Peers>), ApiError> {
    let remote = v
        .usable_remote_queue(name)?
        .ok_or_else(ApiError::not_found)?;
    let peers = b.peers.get().ok_or_else(ApiError::not_found)?;
    Ok((remote, peers))
}

async fn purge_queue(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    caller.require_access(&b, &vhost, Resource::Queue, &name, Access::Read)?;
    let Some(q) = v.find_queue(&name) else {
        let (remote, peers) = on_another_node(&b, &v, &name)?;
        let done = peers.purge(&remote.home, v.name(), &remote.name).await;
        remote.answered(done, v.name())?;
        return no_content();
    };
    not_exclusive(&q, &vhost)?;
    v.purge(&q);
    no_content()
}

/// `POST /api/queues/quorum/{vhost}/{name}/replicas/add` `{"node": N}`:
/// node N gets a replica of the replicated queue (it catches up, then
/// votes).
async fn add_replica(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> ApiResult {
    change_replicas(&b, &caller, &vhost, &name, &body, true).await
}

/// `DELETE /api/queues/quorum/{vhost}/{name}/replicas/delete` `{"node": N}`:
/// node N's replica of the replicated queue goes.
async fn delete_replica(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> ApiResult {
    change_replicas(&b, &caller, &vhost, &name, &body, false).await
}

/// `GET /api/queues/quorum/{vhost}/{name}/status`: a row per member of
/// the replicated queue's group, as its own node reports it, under the
/// column names of RabbitMQ 3.10's `rabbitmq-queues quorum_status` (a
/// member whose node does not answer is `noproc`, its indexes empty).
async fn quorum_status(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    let replicated = v
        .find_remote_queue(&name)
        .filter(crate::peers::RemoteQueue::replicated);
    let Some(q) = replicated else {
        // RabbitMQ's error for a classic queue.
        return match v.find_queue(&name).is_some() || v.find_remote_queue(&name).is_some() {
            true => Err(ApiError::bad_request("classic_queue_not_supported")),
            false => Err(ApiError::not_found()),
        };
    };
    let peers = b.peers.get().ok_or_else(ApiError::not_found)?;
    let rows = peers
        .quorum_status(&vhost, &q.name)
        .await
        .map_err(crate::meta::MetaError::Unavailable)?;
    let index = |i: Option<u64>| i.map_or_else(|| json!(""), |i| json!(i));
    ok(Value::Array(
        rows.into_iter()
            .map(|r| {
                json!({
                    "Node Name": r.node,
                    "Raft State": r.raft_state,
                    "Log Index": index(r.log_index),
                    "Commit Index": index(r.commit_index),
                    "Snapshot Index": index(r.snapshot_index),
                    "Term": index(r.term),
                    "Machine Version": index(r.machine_version),
                })
            })
            .collect(),
    ))
}

async fn change_replicas(
    b: &Broker,
    caller: &Caller,
    vhost: &str,
    name: &str,
    body: &Value,
    add: bool,
) -> ApiResult {
    caller.require_admin()?;
    let v = visible_vhost(b, caller, vhost)?;
    let node = body
        .get("node")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("a 'node' is required"))?;
    let q = v
        .find_remote_queue(name)
        .filter(crate::peers::RemoteQueue::replicated)
        .ok_or_else(ApiError::not_found)?;
    let peers = b.peers.get().ok_or_else(ApiError::not_found)?;
    match peers.change_members(vhost, &q.name, node, add).await {
        Ok(()) => no_content(),
        Err(r) if r.code == 0 => Err(crate::meta::MetaError::Unavailable(r.text).into()),
        Err(r) => Err(crate::error::AmqpError::channel(r.code, r.text).into()),
    }
}

/// The default exchange, which the router keeps implicit but RabbitMQ lists.
fn default_exchange() -> exchange::ExchangeDef {
    exchange::ExchangeDef {
        name: ShortStr::from_static(""),
        kind: exchange::ExchangeKind::Direct,
        durable: true,
        auto_delete: false,
        internal: false,
        arguments: amqp_codec::FieldTable::new(),
    }
}

fn exchanges_of(v: &Vhost) -> Vec<Value> {
    let router = v.router.read();
    let default = default_exchange();
    let mut xs: Vec<_> = std::iter::once(&default)
        .chain(router.exchanges())
        .collect();
    xs.sort_by(|a, b| a.name.cmp(&b.name));
    xs.iter().map(|x| exchange_json(v, &router, x)).collect()
}

/// An exchange as the API shows it, with its `message_stats` once it had a
/// publish (as RabbitMQ: `publish_in`, and `publish_out`, the queue copies
/// it made), counted on this node.
fn exchange_json(v: &Vhost, router: &exchange::Router, x: &exchange::ExchangeDef) -> Value {
    let mut out = exchange(v.name(), x);
    let counts = router.traffic(x.name.as_str()).unwrap_or_default();
    if counts[0] > 0 {
        let rates = v.exchange_rates(x.name.as_str());
        let mut stats = Map::new();
        for (i, key) in ["publish_in", "publish_out"].into_iter().enumerate() {
            stats.insert(key.to_owned(), json!(counts[i]));
            stats.insert(format!("{key}_details"), json!({"rate": rates[i]}));
        }
        out["message_stats"] = Value::Object(stats);
    }
    out
}

async fn list_all_exchanges(State(b): Shared, caller: Caller, Query(q): Listing) -> ApiResult {
    across_vhosts(&b, &caller, &q, exchanges_of)
}

async fn list_exchanges(
    State(b): Shared,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Listing,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    listing(&q, exchanges_of(&v))
}

/// RabbitMQ names the default exchange `amq.default` in API paths.
fn exchange_name(name: &str) -> &str {
    if name == "amq.default" { "" } else { name }
}

async fn get_exchange(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    let name = exchange_name(&name);
    let router = v.router.read();
    if name.is_empty() {
        return ok(exchange_json(&v, &router, &default_exchange()));
    }
    let x = router.exchange(name).ok_or_else(ApiError::not_found)?;
    ok(exchange_json(&v, &router, x))
}

async fn put_exchange(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    short(&name)?;
    caller.require_access(&b, &vhost, Resource::Exchange, &name, Access::Configure)?;
    let body = body_map(body);
    let kind = match body.get("type") {
        Some(Value::String(t)) => t.clone(),
        _ => return Err(ApiError::bad_request("Mandatory fields missing: type")),
    };
    let arguments = json_to_table(body.get("arguments").unwrap_or(&Value::Null))
        .map_err(ApiError::bad_request)?;
    if name.starts_with("amq.") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "access_refused",
            format!("exchange name '{name}' contains reserved prefix 'amq.*'"),
        ));
    }
    let was_new = v.router.read().exchange(&name).is_none();
    let decl = exchange::ExchangeDeclare {
        name: &name,
        kind: &kind,
        durable: flag(&body, "durable", true).map_err(ApiError::bad_request)?,
        auto_delete: flag(&body, "auto_delete", false).map_err(ApiError::bad_request)?,
        internal: flag(&body, "internal", false).map_err(ApiError::bad_request)?,
        arguments: &arguments,
    };
    v.declare_exchange(decl, false).await?;
    created(was_new)
}

async fn delete_exchange(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    caller.require_access(&b, &vhost, Resource::Exchange, &name, Access::Configure)?;
    if name.starts_with("amq.") || v.router.read().exchange(&name).is_none() {
        return Err(ApiError::not_found());
    }
    v.delete_exchange(&name, false).await?;
    no_content()
}

/// Every binding of a vhost, starting with the default exchange's implicit
/// one to each queue (RabbitMQ lists those too).
fn all_bindings(v: &Vhost) -> Vec<exchange::BindingDef> {
    let mut queues = v.queues();
    queues.sort_by(|a, b| a.name.cmp(&b.name));
    let implicit = queues.into_iter().map(|q| exchange::BindingDef {
        source: ShortStr::from_static(""),
        destination: exchange::Destination::Queue(q.name.clone()),
        routing_key: q.name.clone(),
        arguments: amqp_codec::FieldTable::new(),
    });
    let router = v.router.read();
    implicit.chain(router.bindings()).collect()
}

fn bindings_of(v: &Vhost) -> Vec<Value> {
    all_bindings(v)
        .iter()
        .map(|bd| binding(v.name(), bd))
        .collect()
}

async fn list_all_bindings(State(b): Shared, caller: Caller, Query(q): Listing) -> ApiResult {
    across_vhosts(&b, &caller, &q, bindings_of)
}

async fn list_bindings(
    State(b): Shared,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Listing,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    listing(&q, bindings_of(&v))
}

/// The destination a binding path names: `q` for a queue, `e` for an exchange.
/// An exclusive queue belongs to its connection: the API, which is no
/// connection, may not delete, purge, bind, unbind or read it (405).
fn not_exclusive(q: &crate::queue::QueueHandle, vhost: &str) -> Result<(), ApiError> {
    if q.exclusive_owner.is_some() {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "resource_locked",
            format!(
                "cannot obtain exclusive access to locked queue '{}' in vhost '{vhost}'",
                q.name
            ),
        ));
    }
    Ok(())
}

/// A binding's destination queue, if it is one, must not be exclusive.
fn destination_not_exclusive(v: &Vhost, dest: &exchange::Destination) -> Result<(), ApiError> {
    match dest {
        exchange::Destination::Queue(q) => match v.find_queue(q) {
            Some(q) => not_exclusive(&q, v.name()),
            None => Ok(()),
        },
        exchange::Destination::Exchange(_) => Ok(()),
    }
}

/// Binding and unbinding need what `queue.bind` / `exchange.bind` need:
/// write access to the destination and read access to the source.
fn require_bind_access(
    b: &Broker,
    caller: &Caller,
    vhost: &str,
    source: &str,
    dest: &exchange::Destination,
) -> Result<(), ApiError> {
    match dest {
        exchange::Destination::Queue(q) => {
            caller.require_access(b, vhost, Resource::Queue, q, Access::Write)?;
        }
        exchange::Destination::Exchange(x) => {
            caller.require_access(b, vhost, Resource::Exchange, x, Access::Write)?;
        }
    }
    let source = exchange_name(source);
    caller.require_access(b, vhost, Resource::Exchange, source, Access::Read)
}

fn destination(kind: &str, name: &str) -> Result<exchange::Destination, ApiError> {
    match kind {
        "q" => Ok(exchange::Destination::Queue(short(name)?)),
        "e" => Ok(exchange::Destination::Exchange(short(name)?)),
        _ => Err(ApiError::not_found()),
    }
}

/// The bindings from `source` to the destination, as their definitions.
fn pair_bindings(
    v: &Vhost,
    source: &str,
    dest: &exchange::Destination,
) -> Vec<exchange::BindingDef> {
    let source = exchange_name(source);
    all_bindings(v)
        .into_iter()
        .filter(|bd| bd.source.as_str() == source && bd.destination == *dest)
        .collect()
}

async fn list_pair_bindings(
    State(b): Shared,
    caller: Caller,
    Path((vhost, source, kind, dest)): Path<(String, String, String, String)>,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    let dest = destination(&kind, &dest)?;
    ok(Value::Array(
        pair_bindings(&v, &source, &dest)
            .iter()
            .map(|bd| binding(v.name(), bd))
            .collect(),
    ))
}

async fn get_binding(
    State(b): Shared,
    caller: Caller,
    Path((vhost, source, kind, dest, props)): Path<(String, String, String, String, String)>,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    let dest = destination(&kind, &dest)?;
    let bd = pair_bindings(&v, &source, &dest)
        .into_iter()
        .find(|bd| names_binding(&props, bd))
        .ok_or_else(ApiError::not_found)?;
    ok(binding(v.name(), &bd))
}

/// `DELETE /api/bindings/{vhost}/e/{source}/{q|e}/{destination}/{props}`:
/// removes the binding that `props` (its `properties_key`) names.
async fn unbind(
    State(b): Shared,
    caller: Caller,
    Path((vhost, source, kind, dest, props)): Path<(String, String, String, String, String)>,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    let dest = destination(&kind, &dest)?;
    require_bind_access(&b, &caller, &vhost, &source, &dest)?;
    destination_not_exclusive(&v, &dest)?;
    let matching: Vec<_> = pair_bindings(&v, &source, &dest)
        .into_iter()
        .filter(|bd| names_binding(&props, bd) && !bd.source.is_empty())
        .collect();
    if matching.is_empty() {
        return Err(ApiError::not_found());
    }
    for bd in &matching {
        caller.require_topic_access(&b, &v, &bd.source, &bd.routing_key, Access::Read)?;
    }
    for bd in &matching {
        v.unbind(bd).await?;
    }
    no_content()
}

async fn bind(
    State(b): Shared,
    caller: Caller,
    Path((vhost, source, kind, dest)): Path<(String, String, String, String)>,
    body: Body,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    require_bind_access(&b, &caller, &vhost, &source, &destination(&kind, &dest)?)?;
    if exchange_name(&source).is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "access_refused",
            "operation not permitted on the default exchange",
        ));
    }
    let target = destination(&kind, &dest)?;
    let exists = match &target {
        exchange::Destination::Queue(q) => v.find_queue(q).is_some(),
        exchange::Destination::Exchange(x) => v.router.read().exchange(x).is_some(),
    };
    if v.router.read().exchange(&source).is_none() || !exists {
        return Err(ApiError::not_found());
    }
    let body = body_map(body);
    let routing_key = match body.get("routing_key") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(k)) => k.clone(),
        Some(_) => return Err(ApiError::bad_request("routing_key must be a string")),
    };
    let def = exchange::BindingDef {
        source: short(&source)?,
        destination: target,
        routing_key: short(&routing_key)?,
        arguments: json_to_table(body.get("arguments").unwrap_or(&Value::Null))
            .map_err(ApiError::bad_request)?,
    };
    destination_not_exclusive(&v, &def.destination)?;
    caller.require_topic_access(&b, &v, &def.source, &def.routing_key, Access::Read)?;
    v.bind(&def).await?;
    let location = format!(
        "/api/bindings/{}/e/{}/{kind}/{}/{}",
        percent(&vhost),
        percent(&source),
        percent(&dest),
        percent(&properties_key(&def))
    );
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, location)],
    )
        .into_response())
}

fn node_json(b: &Broker) -> Value {
    let mut v = stats_json(&b.config.node_name, true, &b.node_stats());
    v["partitions"] = json!([]);
    v["cluster_links"] = json!([]);
    v["os_pid"] = json!(std::process::id().to_string());
    v["db_dir"] = json!(b.config.data_dir.display().to_string());
    v["rates_mode"] = json!("basic");
    v["mem_calculation_strategy"] = json!("rss");
    v["exchange_types"] = exchange_types();
    // What RabbitMQ needs plugins for, Warren has built in.
    v["enabled_plugins"] = json!(["rabbitmq_management", "rabbitmq_prometheus"]);
    v["auth_mechanisms"] = json!([
        {"name": "PLAIN", "description": "SASL PLAIN authentication mechanism", "enabled": true},
        {"name": "AMQPLAIN", "description": "QPid AMQPLAIN mechanism", "enabled": true},
        {"name": "EXTERNAL", "description": "TLS client certificate (EXTERNAL)", "enabled": b.config.tls.is_some()},
    ]);
    // The node's churn, under RabbitMQ's names, with rates.
    for (name, count, rate) in b.metrics.overview_stats() {
        if let Some(key) = name.strip_prefix("churn.") {
            v[key] = json!(count);
            v[format!("{key}_details")] = json!({"rate": rate});
        }
    }
    v
}

/// A node's entry of `/api/nodes` from its figures (the gauges' rates as
/// RabbitMQ's `{gauge}_details`).
fn stats_json(name: &str, running: bool, stats: &crate::peers::NodeStats) -> Value {
    let mut v = serde_json::to_value(stats).unwrap_or_else(|_| json!({}));
    if let Some(Value::Object(rates)) = v.as_object_mut().and_then(|m| m.remove("gauge_rates")) {
        for (gauge, rate) in rates {
            v[format!("{gauge}_details")] = json!({ "rate": rate });
        }
    }
    // The store's I/O under RabbitMQ's names: counts with rates, and the
    // average time per operation over the last period (ms; 0 without any).
    if let Some(m) = v.as_object_mut() {
        m.remove("io");
        let io = &stats.io;
        for (i, (name, _, _, micros)) in crate::metrics::IO_COUNTERS.iter().enumerate() {
            if !micros {
                m.insert((*name).to_owned(), json!(io.counts[i]));
                m.insert(format!("{name}_details"), json!({"rate": io.rates[i]}));
            }
        }
        // (Indexes into IO_COUNTERS: the operation's count, its time.)
        for (name, ops, time) in [
            ("io_read_avg_time", 0, 9),
            ("io_write_avg_time", 2, 10),
            ("io_sync_avg_time", 4, 11),
        ] {
            let avg = if io.rates[ops] > 0.0 {
                io.rates[time] / io.rates[ops] / 1000.0
            } else {
                0.0
            };
            m.insert(name.to_owned(), json!(avg));
        }
    }
    v["name"] = json!(name);
    v["type"] = json!("disc");
    v["running"] = json!(running);
    v
}

async fn list_nodes(State(b): Shared, caller: Caller, Query(q): Listing) -> ApiResult {
    caller.require_monitoring()?;
    let Some(peers) = b.peers.get() else {
        return listing(&q, vec![node_json(&b)]);
    };
    // This node's figures now; the others' as they last gossiped them
    // (none for a node not heard from).
    let nodes: Vec<Value> = peers
        .members()
        .iter()
        .map(|m| {
            let mut v = if m.name == b.config.node_name {
                node_json(&b)
            } else if let Some(stats) = &m.stats {
                stats_json(&m.name, m.running, stats)
            } else {
                json!({"name": m.name, "type": "disc", "running": m.running})
            };
            v["running"] = json!(m.running);
            v["cluster_links"] = json!(m.cluster_addr);
            v["metadata_role"] = json!(role(m));
            v["partitions"] = json!(m.partitions);
            v
        })
        .collect();
    listing(&q, nodes)
}

fn role(m: &crate::peers::Member) -> &'static str {
    match (m.leader, m.voter) {
        (true, _) => "leader",
        (false, true) => "voter",
        (false, false) => "learner",
    }
}

/// `GET /api/cluster-name`, as RabbitMQ's.
async fn cluster_name(State(b): Shared, caller: Caller) -> ApiResult {
    caller.require_monitoring()?;
    let name = b
        .peers
        .get()
        .map_or_else(|| b.config.node_name.clone(), |p| p.cluster_name());
    ok(json!({"name": name}))
}

/// `DELETE /api/cluster/nodes/{name}`: forgets a node (Warren's
/// `forget_cluster_node`); 404 if it is not a member, 400 on a node alone.
async fn forget_node(State(b): Shared, caller: Caller, Path(name): Path<String>) -> ApiResult {
    caller.require_admin()?;
    let Some(peers) = b.peers.get() else {
        return Err(ApiError::bad_request("this node is not clustered"));
    };
    peers.forget(&name).await?;
    no_content()
}

/// `POST /api/cluster/join` with `{"node": "host:port"}` (or a node name
/// `name@host`, on the default cluster port): Warren's `join_cluster`.
/// This node leaves whatever cluster it is in and joins that node's, with
/// none of its own definitions (as `rabbitmqctl reset` then `join_cluster`):
/// it is refused while the node holds a durable queue, whose messages the
/// reset would lose. On success the answer goes out and the node restarts
/// at once; it serves again once it has joined.
async fn join_cluster(State(b): Shared, caller: Caller, body: Body) -> ApiResult {
    caller.require_admin()?;
    let body = body_map(body);
    let Some(target) = body.get("node").and_then(Value::as_str) else {
        return Err(ApiError::bad_request(
            "the body names the node to join: {\"node\": \"host:port\"}",
        ));
    };
    let Some(joiner) = b.cluster_join.get() else {
        return Err(ApiError::bad_request(
            "this node cannot join a cluster: start it with --cluster-secret-file (the secret the cluster's nodes share)",
        ));
    };
    let held: Vec<String> = b
        .vhost_list()
        .iter()
        .flat_map(|v| {
            v.queues()
                .into_iter()
                .filter(|q| q.durable)
                .map(|q| format!("'{}' in vhost '{}'", q.name, v.name()))
                .collect::<Vec<_>>()
        })
        .collect();
    if !held.is_empty() {
        return Err(ApiError::bad_request(format!(
            "this node holds {} durable queue(s) ({}{}); joining a cluster resets the node and would lose them: delete them first",
            held.len(),
            held.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
            if held.len() > 3 { ", ..." } else { "" }
        )));
    }
    let joined = joiner.join(target).await.map_err(ApiError::bad_request)?;
    tracing::warn!(node = %joined.node, cluster = %joined.cluster, "join_cluster: restarting to join the cluster");
    b.request_restart();
    ok(json!({"node": joined.node, "cluster": joined.cluster, "restarting": true}))
}

/// The octets a limit body names: `{"absolute": octets}`, or a fraction of
/// the machine's memory as `{"fraction": f}` (memory watermark) or
/// `{"mem_relative": f}` (disk limit), as rabbitmqctl takes them.
fn limit_octets(
    body: &Map<String, Value>,
    relative: &str,
    total_memory_available: Option<u64>,
) -> Result<u64, ApiError> {
    if let Some(v) = body.get("absolute") {
        // Octets, or a string with a unit ("2GB", "512MiB") as in the
        // configuration.
        let octets = match v {
            Value::String(text) => match crate::alarm::parse_amount(text) {
                Ok(crate::alarm::Amount::Octets(n)) => Some(n),
                _ => None,
            },
            other => other.as_u64(),
        };
        return octets.ok_or_else(|| {
            ApiError::bad_request(format!(
                "absolute must be octets or an amount like \"2GB\", not {v}"
            ))
        });
    }
    let Some(f) = body.get(relative) else {
        return Err(ApiError::bad_request(format!(
            "expected {{\"absolute\": octets}} or {{\"{relative}\": number}}"
        )));
    };
    let f = f
        .as_f64()
        .filter(|f| f.is_finite() && *f >= 0.0)
        .ok_or_else(|| ApiError::bad_request(format!("{relative} must be a number >= 0")))?;
    let total = total_memory_available
        .or_else(crate::alarm::total_memory)
        .ok_or_else(|| ApiError::internal("cannot read the machine's memory size"))?;
    Ok((total as f64 * f) as u64)
}

/// Changes the memory high watermark at run time (Warren's endpoint for
/// `warrenctl set_vm_memory_high_watermark`; RabbitMQ does this through
/// rabbitmqctl). Not persisted: the configuration applies after a restart.
async fn put_memory_watermark(
    State(b): Shared,
    caller: Caller,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult {
    b.alarms
        .set_memory_limit(node_limit(&b, &caller, &name, body, "fraction")?);
    no_content()
}

/// Changes the free disk space limit at run time (`warrenctl
/// set_disk_free_limit`). Not persisted.
async fn put_disk_free_limit(
    State(b): Shared,
    caller: Caller,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult {
    b.alarms
        .set_disk_limit(node_limit(&b, &caller, &name, body, "mem_relative")?);
    no_content()
}

/// A limit PUT on node `name`: administrators only, this node only, the
/// octets the body names (see [`limit_octets`]).
fn node_limit(
    b: &Broker,
    caller: &Caller,
    name: &str,
    body: Body,
    relative: &str,
) -> Result<u64, ApiError> {
    caller.require_admin()?;
    if name != b.config.node_name {
        return Err(ApiError::not_found());
    }
    limit_octets(&body_map(body), relative, b.config.total_memory_available)
}

async fn get_node(State(b): Shared, caller: Caller, Path(name): Path<String>) -> ApiResult {
    caller.require_monitoring()?;
    if name != b.config.node_name {
        return Err(ApiError::not_found());
    }
    let mut v = node_json(&b);
    v["environment"] = environment_json(&b);
    ok(v)
}

/// The node's settings in effect (`warrenctl environment`, RabbitMQ's
/// application environment): Warren's names, RabbitMQ's units (octets,
/// milliseconds). The default user's password is left out.
fn environment_json(b: &Broker) -> Value {
    let c = &b.config;
    let addr = |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string());
    json!({
        "data_dir": c.data_dir.display().to_string(),
        "amqp_listener": c.plain_listener.then(|| c.bind.to_string()),
        "amqps_listener": c.tls.as_ref().map(|(a, _)| a.to_string()),
        "management_listener": addr(c.management),
        "prometheus_listener": addr(c.prometheus),
        "heartbeat": c.heartbeat,
        "frame_max": c.frame_max,
        "channel_max": c.channel_max,
        "max_message_size": c.max_message_size,
        "handshake_timeout": c.handshake_timeout.as_millis() as u64,
        "consumer_timeout": c.consumer_timeout.as_millis() as u64,
        "max_connections": c.max_connections,
        "max_consumers_per_channel": c.max_consumers_per_channel,
        "vm_memory_high_watermark": b.alarms.memory_limit(),
        "disk_free_limit": b.alarms.disk_limit(),
        "queue_flow_limit": c.queue_flow_limit,
        "store_backlog_limit": c.store_backlog_limit,
        "default_user": c.default_user,
        "loopback_users": c.loopback_users,
        "load_definitions": c.load_definitions.as_ref().map(|p| p.display().to_string()),
    })
}

async fn vhost_permissions(
    State(b): Shared,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Listing,
) -> ApiResult {
    caller.require_admin()?;
    if b.vhost(&vhost).is_none() {
        return Err(ApiError::not_found());
    }
    listing(
        &q,
        b.auth
            .permissions()
            .iter()
            .filter(|p| p.vhost == vhost)
            .map(permission_json)
            .collect(),
    )
}

async fn user_permissions(
    State(b): Shared,
    caller: Caller,
    Path(user): Path<String>,
    Query(q): Listing,
) -> ApiResult {
    caller.require_admin()?;
    if b.auth.user(&user).is_none() {
        return Err(ApiError::not_found());
    }
    listing(
        &q,
        b.auth
            .permissions()
            .iter()
            .filter(|p| p.user == user)
            .map(permission_json)
            .collect(),
    )
}

/// Percent-encodes a path segment (RFC 3986 unreserved characters stay).
fn percent(s: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

async fn alarms(State(b): Shared, _caller: Caller) -> ApiResult {
    let a = b.alarms.current();
    if a.any() {
        let mut resource = Vec::new();
        if a.memory {
            resource.push("memory");
        }
        if a.disk {
            resource.push("disk");
        }
        Ok((
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "failed",
                "reason": format!("resource alarm(s) in effect: {}", resource.join(", ")),
                "alarms": resource.iter().map(|r| json!({"node": b.config.node_name, "resource": r})).collect::<Vec<_>>(),
            })),
        )
            .into_response())
    } else {
        ok(json!({"status": "ok"}))
    }
}

/// RabbitMQ's `node-is-quorum-critical` health check: failed (503) when a
/// replicated queue with a replica on this node would lose its majority if
/// this node stopped (its online members, this one aside, are not a
/// majority of its members).
async fn node_is_quorum_critical(State(b): Shared, _caller: Caller) -> ApiResult {
    let me = b.config.node_name.clone();
    let mut critical = Vec::new();
    if let Some(peers) = b.peers.get() {
        for v in b.vhost_list() {
            for q in v.remote_queues() {
                if !q.members.contains(&me) {
                    continue;
                }
                let status = tokio::time::timeout(
                    PEER_LISTING_TIMEOUT,
                    peers.replica_status(v.name(), &q.name),
                )
                .await;
                let online_others = match status {
                    Ok(Ok(s)) => s.online.iter().filter(|m| **m != me).count(),
                    // Its members cannot be asked: it has no majority to
                    // lose, or none that answers.
                    _ => continue,
                };
                if online_others < q.members.len() / 2 + 1 {
                    critical.push(json!({
                        "name": q.name.as_str(),
                        "readable_name": format!("queue '{}' in vhost '{}'", q.name, v.name()),
                        "virtual_host": v.name(),
                        "type": "quorum",
                    }));
                }
            }
        }
    }
    if critical.is_empty() {
        return ok(json!({"status": "ok"}));
    }
    Ok((
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "status": "failed",
            "reason": "There are quorum queues that would lose their quorum if the target node is shut down",
            "queues": critical,
        })),
    )
        .into_response())
}

async fn export_definitions(State(b): Shared, caller: Caller) -> ApiResult {
    caller.require_admin()?;
    ok(crate::definitions::export(&b))
}

async fn import_definitions(
    State(b): Shared,
    caller: Caller,
    Json(defs): Json<Value>,
) -> ApiResult {
    caller.require_admin()?;
    match crate::definitions::import(&b, &defs).await {
        Ok(_) => no_content(),
        Err(crate::definitions::ImportError::Store(e)) => Err(ApiError::internal(e)),
        Err(e) => Err(ApiError::bad_request(e.to_string())),
    }
}

async fn export_vhost_definitions(
    State(b): Shared,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    if b.vhost(&vhost).is_none() {
        return Err(ApiError::not_found());
    }
    ok(crate::definitions::export_vhost(&b, &vhost))
}

async fn import_vhost_definitions(
    State(b): Shared,
    caller: Caller,
    Path(vhost): Path<String>,
    Json(defs): Json<Value>,
) -> ApiResult {
    caller.require_admin()?;
    if b.vhost(&vhost).is_none() {
        return Err(ApiError::not_found());
    }
    match crate::definitions::import_vhost(&b, &vhost, &defs).await {
        Ok(_) => no_content(),
        Err(crate::definitions::ImportError::Store(e)) => Err(ApiError::internal(e)),
        Err(e) => Err(ApiError::bad_request(e.to_string())),
    }
}

/// This node's connections, oldest first.
fn connections_by_id(b: &Broker) -> Vec<Arc<crate::session::ConnectionShared>> {
    let mut conns: Vec<_> = b
        .live_connections
        .iter()
        .map(|c| c.value().clone())
        .collect();
    conns.sort_by_key(|c| c.id);
    conns
}

fn visible_connections(b: &Broker, caller: &Caller) -> Vec<Arc<crate::session::ConnectionShared>> {
    let mut conns = connections_by_id(b);
    conns.retain(|c| caller.may_see_all() || c.user == caller.name);
    conns
}

fn connection_json(c: &crate::session::ConnectionShared, node: &str) -> Value {
    let mut out = json!({
        "name": c.name,
        "node": node,
        "type": "network",
        "protocol": "AMQP 0-9-1",
        "user": c.user,
        "vhost": c.vhost,
        "peer_host": c.peer.ip().to_string(),
        "peer_port": c.peer.port(),
        "ssl": c.tls,
        "channels": c.channels.lock().len(),
        "frame_max": c.frame_max.load(std::sync::atomic::Ordering::Relaxed),
        "channel_max": c.channel_max,
        "connected_at": c.connected_at,
        "state": if c.congested.lock().is_empty() { "running" } else { "flow" },
        "client_properties": crate::json::table_to_json(&c.client_properties),
        "host": c.local.ip().to_canonical().to_string(),
        "port": c.local.port(),
        "auth_mechanism": c.auth_mechanism,
        "timeout": c.heartbeat,
        "send_pend": 0,
        "user_who_performed_action": c.user,
    });
    // A plain connection's TLS fields are empty, as RabbitMQ's.
    for key in [
        "ssl_protocol",
        "ssl_key_exchange",
        "ssl_cipher",
        "ssl_hash",
        "peer_cert_subject",
        "peer_cert_issuer",
        "peer_cert_validity",
    ] {
        out[key] = if c.tls { Value::Null } else { json!("") };
    }
    // Traffic, under RabbitMQ's names: octets read from and written to
    // the socket, and reads and frames written.
    let (send_oct, send_cnt) = c.outbox.sent();
    let [recv_rate, send_rate] = c.octet_rates.rates();
    out["recv_oct"] = json!(c.recv_oct.load(std::sync::atomic::Ordering::Relaxed));
    out["recv_oct_details"] = json!({"rate": recv_rate});
    out["recv_cnt"] = json!(c.recv_cnt.load(std::sync::atomic::Ordering::Relaxed));
    out["send_oct"] = json!(send_oct);
    out["send_oct_details"] = json!({"rate": send_rate});
    out["send_cnt"] = json!(send_cnt);
    // As RabbitMQ: the name a client gave its connection, when it gave one.
    if let Some(amqp_codec::FieldValue::LongStr(name)) = c.client_properties.get("connection_name")
    {
        out["user_provided_name"] = Value::String(String::from_utf8_lossy(name).into_owned());
    }
    out
}

/// This node's connections, all of them, as `/api/connections` lists them.
pub(super) fn local_connections(b: &Broker) -> Vec<Value> {
    connections_by_id(b)
        .iter()
        .map(|c| connection_json(c, &b.config.node_name))
        .collect()
}

/// This node's `what` and, in a cluster, every other running node's (a node
/// that does not answer in time is left out, and logged).
async fn cluster_listing(b: &Broker, what: crate::peers::Listing) -> Vec<Value> {
    let mut out = super::local_listing(b, what);
    let Some(peers) = b.peers.get() else {
        return out;
    };
    let others: Vec<String> = peers
        .members()
        .into_iter()
        .filter(|m| m.running && m.name != b.config.node_name)
        .map(|m| m.name)
        .collect();
    let answers = ask_nodes(peers.as_ref(), &others, what).await;
    for (node, answer) in others.iter().zip(answers) {
        match answer {
            Ok(items) => out.extend(items),
            Err(e) => tracing::debug!(node = %node, error = %e, ?what, "listing another node's"),
        }
    }
    out
}

/// Whether `caller` may see an item of user `user`'s (its own, or all of
/// them with the `monitoring` or `administrator` tag).
fn may_see_user(caller: &Caller, item: &Value) -> bool {
    caller.may_see_all() || item["user"].as_str() == Some(caller.name.as_str())
}

async fn list_connections(State(b): Shared, caller: Caller, Query(q): Listing) -> ApiResult {
    let mut items = cluster_listing(&b, crate::peers::Listing::Connections).await;
    items.retain(|c| may_see_user(&caller, c));
    listing(&q, items)
}

/// Connection `name` as `/api/connections` lists it, on whichever node it
/// is (this one first).
async fn find_connection(b: &Broker, caller: &Caller, name: &str) -> Result<Value, ApiError> {
    if let Some(c) = visible_connections(b, caller)
        .into_iter()
        .find(|c| c.name == name)
    {
        return Ok(connection_json(&c, &b.config.node_name));
    }
    cluster_listing(b, crate::peers::Listing::Connections)
        .await
        .into_iter()
        .find(|c| c["name"] == name && may_see_user(caller, c))
        .ok_or_else(ApiError::not_found)
}

async fn get_connection(State(b): Shared, caller: Caller, Path(name): Path<String>) -> ApiResult {
    ok(find_connection(&b, &caller, &name).await?)
}

/// Closes a connection with 320 CONNECTION_FORCED and the `X-Reason` header
/// as its text (RabbitMQ's default text without one). Administrators may
/// close any connection, other users their own.
async fn close_connection(
    State(b): Shared,
    caller: Caller,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
) -> ApiResult {
    let c = find_connection(&b, &caller, &name).await?;
    if c["user"].as_str() != Some(caller.name.as_str()) {
        caller.require_admin()?;
    }
    let reason = headers
        .get("x-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Closed via management plugin");
    let node = c["node"].as_str().unwrap_or_default();
    let closed = match b.peers.get() {
        Some(peers) if node != b.config.node_name => peers
            .close_connection(node, &name, reason)
            .await
            .map_err(|e| ApiError::internal(format!("cannot close it on node '{node}': {e}")))?,
        _ => close_local(&b, &name, reason),
    };
    if !closed {
        // It closed in the meantime.
        return Err(ApiError::not_found());
    }
    no_content()
}

/// Closes this node's connection `name` (320 CONNECTION_FORCED, `reason`).
pub(super) fn close_local(b: &Broker, name: &str, reason: &str) -> bool {
    let Some(c) = connections_by_id(b).into_iter().find(|c| c.name == name) else {
        return false;
    };
    *c.close_reason.lock() = reason.to_owned();
    c.force_close.cancel();
    true
}

/// This node's channels, all of them, as `/api/channels` lists them.
pub(super) fn local_channels(b: &Broker) -> Vec<Value> {
    let mut out = Vec::new();
    for c in connections_by_id(b) {
        for (number, ch) in c.open_channels() {
            let (unacked, prefetch, consumers) = ch.stats();
            let modes = ch.modes();
            let uncommitted = ch.uncommitted();
            out.push(json!({
                "name": format!("{} ({number})", c.name),
                "number": number,
                "node": b.config.node_name,
                "user": c.user,
                "vhost": c.vhost,
                "connection_details": {
                    "name": c.name,
                    "peer_host": c.peer.ip().to_string(),
                    "peer_port": c.peer.port(),
                },
                "consumer_count": consumers,
                "messages_unacknowledged": unacked,
                "global_prefetch_count": prefetch,
                "prefetch_count": modes.prefetch,
                "confirm": modes.confirm,
                "transactional": modes.transactional,
                "messages_unconfirmed": ch.publishing().1,
                "messages_uncommitted": uncommitted.0,
                "acks_uncommitted": uncommitted.1,
                "user_who_performed_action": c.user,
                "message_stats": {},
                "state": "running",
            }));
            if let Some(stats) = out
                .last_mut()
                .and_then(|c| c["message_stats"].as_object_mut())
            {
                ch.stats.write_json(&crate::session::CHANNEL_STATS, stats);
                // deliver_get: deliver, deliver_no_ack, get, get_no_ack.
                let (counts, rates) = ch.stats.snapshot();
                let all = crate::session::stat::DELIVER..crate::session::stat::DELIVER + 4;
                let count: u64 = counts[all.clone()].iter().sum();
                let rate: f64 = rates[all].iter().sum();
                stats.insert("deliver_get".into(), json!(count));
                stats.insert("deliver_get_details".into(), json!({"rate": rate}));
            }
        }
    }
    out
}

async fn list_channels(State(b): Shared, caller: Caller, Query(q): Listing) -> ApiResult {
    let mut items = cluster_listing(&b, crate::peers::Listing::Channels).await;
    items.retain(|c| may_see_user(&caller, c));
    listing(&q, items)
}

/// This node's consumers (of the queues it hosts, wherever the consumer's
/// connection is), all of them, as `/api/consumers` lists them.
pub(super) fn local_consumers(b: &Broker) -> Vec<Value> {
    let mut out = Vec::new();
    for v in b.vhost_list() {
        let mut queues = v.queues();
        queues.sort_by(|a, c| a.name.cmp(&c.name));
        for q in queues {
            out.extend(queue_consumers(&v, &q, &b.config.node_name));
        }
    }
    out
}

/// The consumers of this node's queue `q`, as `/api/consumers` lists
/// them (and a queue's `consumer_details`).
fn queue_consumers(v: &Vhost, q: &crate::queue::QueueHandle, node: &str) -> Vec<Value> {
    let mut out = Vec::new();
    q.kind().for_each_consumer(&mut |c| {
        let sink = c.sink.describe();
        out.push(json!({
            "consumer_tag": sink.tag.as_deref().unwrap_or(c.tag.as_str()),
            "queue": {"name": q.name.as_str(), "vhost": v.name()},
            "channel_details": {
                "name": format!("{} ({})", sink.connection_name, sink.channel),
                "number": sink.channel,
                "connection_name": sink.connection_name,
                "peer_host": sink.peer.ip().to_string(),
                "peer_port": sink.peer.port(),
                "user": sink.user,
                "node": node,
            },
            "ack_required": !c.no_ack,
            "exclusive": c.exclusive,
            "prefetch_count": c.prefetch,
            "priority": c.priority,
            "active": true,
            "activity_status": "up",
            "arguments": {},
        }));
    });
    out
}

async fn list_consumers(State(b): Shared, caller: Caller, Query(q): Listing) -> ApiResult {
    let visible: Vec<String> = visible_vhosts(&b, &caller)
        .iter()
        .map(|v| v.name().to_owned())
        .collect();
    let mut items = cluster_listing(&b, crate::peers::Listing::Consumers).await;
    items.retain(|c| {
        c["queue"]["vhost"]
            .as_str()
            .is_some_and(|v| visible.iter().any(|n| n == v))
    });
    listing(&q, items)
}

/// Every visible vhost's policies of `kind`, as the API lists them (RabbitMQ
/// sorts them by priority unless asked otherwise).
fn all_policies(b: &Broker, caller: &Caller, q: &ListQuery, kind: PolicyKind) -> ApiResult {
    let mut out = Vec::new();
    for v in visible_vhosts(b, caller) {
        out.extend(v.policies_of(kind).read().iter().map(Policy::to_json));
    }
    listing(q, by_priority(out))
}

/// A visible vhost's policies of `kind`.
fn vhost_policies(
    b: &Broker,
    caller: &Caller,
    vhost: &str,
    q: &ListQuery,
    kind: PolicyKind,
) -> ApiResult {
    let v = visible_vhost(b, caller, vhost)?;
    let out = v
        .policies_of(kind)
        .read()
        .iter()
        .map(Policy::to_json)
        .collect();
    listing(q, by_priority(out))
}

/// Policies in RabbitMQ's default order for them: by priority, then vhost
/// and name.
fn by_priority(mut items: Vec<Value>) -> Vec<Value> {
    let key = |p: &Value| {
        (
            p["priority"].as_i64().unwrap_or(0),
            p["vhost"].as_str().unwrap_or("").to_owned(),
            p["name"].as_str().unwrap_or("").to_owned(),
        )
    };
    items.sort_by_cached_key(key);
    items
}

fn one_policy(b: &Broker, vhost: &str, name: &str, kind: PolicyKind) -> ApiResult {
    let v = b.vhost(vhost).ok_or_else(ApiError::not_found)?;
    let policies = v.policies_of(kind).read();
    let p = policies
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(ApiError::not_found)?;
    ok(p.to_json())
}

/// A `PUT` body with `pattern`, `definition`, and optionally `priority` (0)
/// and `apply-to` (`all`), validated as a policy of `kind`.
fn policy_from_body(
    vhost: &str,
    name: &str,
    body: Body,
    kind: PolicyKind,
) -> Result<Policy, ApiError> {
    short(name)?;
    let body = body_map(body);
    let pattern = body
        .get("pattern")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("Mandatory fields missing: pattern"))?;
    let definition = match body.get("definition") {
        Some(Value::Object(d)) => d.clone(),
        _ => {
            return Err(ApiError::bad_request(
                "Mandatory fields missing: definition",
            ));
        }
    };
    let priority = match body.get("priority") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| ApiError::bad_request("priority must be an integer"))?,
    };
    let apply_to = match body.get("apply-to").and_then(Value::as_str) {
        None => crate::policy::ApplyTo::All,
        Some(a) => crate::policy::ApplyTo::parse(a)
            .ok_or_else(|| ApiError::bad_request(format!("invalid apply-to '{a}'")))?,
    };
    // (RabbitMQ's validation texts end with a newline in the API.)
    Policy::of_kind(kind, vhost, name, pattern, apply_to, priority, definition)
        .map_err(|e| ApiError::bad_request(format!("{e}\n")))
}

async fn store_policy(b: &Arc<Broker>, policy: Policy) -> ApiResult {
    match b.set_policy(policy).await? {
        None => Err(ApiError::vhost_not_found()),
        Some(created) => self::created(created),
    }
}

async fn remove_policy(b: &Arc<Broker>, vhost: &str, name: &str, kind: PolicyKind) -> ApiResult {
    if b.clear_policy(vhost, name, kind).await? {
        no_content()
    } else {
        Err(ApiError::not_found())
    }
}

async fn list_all_policies(State(b): Shared, caller: Caller, Query(q): Listing) -> ApiResult {
    all_policies(&b, &caller, &q, PolicyKind::User)
}

async fn list_policies(
    State(b): Shared,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Listing,
) -> ApiResult {
    vhost_policies(&b, &caller, &vhost, &q, PolicyKind::User)
}

async fn get_policy(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    visible_vhost(&b, &caller, &vhost)?;
    one_policy(&b, &vhost, &name, PolicyKind::User)
}

/// `PUT /api/policies/{vhost}/{name}`: policymakers, in vhosts they see.
async fn put_policy(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    caller.require_policymaker()?;
    if !caller.may_see(&b, &vhost) {
        return Err(ApiError::not_found());
    }
    let policy = policy_from_body(&vhost, &name, body, PolicyKind::User)?;
    store_policy(&b, policy).await
}

async fn delete_policy(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    caller.require_policymaker()?;
    if !caller.may_see(&b, &vhost) {
        return Err(ApiError::not_found());
    }
    remove_policy(&b, &vhost, &name, PolicyKind::User).await
}

/// Operator policies are listed to anyone who sees the vhost (as RabbitMQ
/// does); one of them is shown, set and cleared by administrators only.
async fn list_all_operator_policies(
    State(b): Shared,
    caller: Caller,
    Query(q): Listing,
) -> ApiResult {
    all_policies(&b, &caller, &q, PolicyKind::Operator)
}

async fn list_operator_policies(
    State(b): Shared,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Listing,
) -> ApiResult {
    vhost_policies(&b, &caller, &vhost, &q, PolicyKind::Operator)
}

async fn get_operator_policy(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    one_policy(&b, &vhost, &name, PolicyKind::Operator)
}

async fn put_operator_policy(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    caller.require_admin()?;
    let policy = policy_from_body(&vhost, &name, body, PolicyKind::Operator)?;
    store_policy(&b, policy).await
}

async fn delete_operator_policy(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    remove_policy(&b, &vhost, &name, PolicyKind::Operator).await
}

/// A vhost's limits as `/api/vhost-limits` lists them; none if it has none.
fn vhost_limits_json(v: &Vhost) -> Option<Value> {
    let limits = crate::json::limits_json(&v.limits.lock());
    (!limits.is_empty()).then(|| json!({"vhost": v.name(), "value": limits}))
}

async fn list_all_vhost_limits(State(b): Shared, caller: Caller, Query(q): Listing) -> ApiResult {
    let out = visible_vhosts(&b, &caller)
        .iter()
        .filter_map(|v| vhost_limits_json(v))
        .collect();
    listing(&q, out)
}

async fn list_vhost_limits(
    State(b): Shared,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Listing,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    listing(&q, vhost_limits_json(&v).into_iter().collect())
}

/// `PUT /api/vhost-limits/{vhost}/{max-connections|max-queues}` with
/// `{"value": N}`; a negative value lifts the limit. Administrators only.
async fn put_vhost_limit(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    caller.require_admin()?;
    let v = b.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let body = body_map(body);
    let value = body
        .get("value")
        .ok_or_else(|| ApiError::bad_request("Mandatory fields missing: value"))?;
    b.update_vhost_limits(&v, |limits| crate::json::set_limit(limits, &name, value))
        .await?
        .map_err(ApiError::bad_request)?;
    no_content()
}

/// `DELETE /api/vhost-limits/{vhost}/{name}`: lifts that limit.
async fn delete_vhost_limit(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    let v = b.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    b.update_vhost_limits(&v, |limits| {
        crate::json::set_limit(limits, &name, &json!(-1))
    })
    .await?
    .map_err(ApiError::bad_request)?;
    no_content()
}

/// Message properties from the API's JSON (RabbitMQ's field names).
fn properties_from_json(v: &Value) -> Result<amqp_codec::BasicProperties, ApiError> {
    let Some(map) = v.as_object() else {
        return Ok(amqp_codec::BasicProperties::default());
    };
    let text = |k: &str| -> Result<Option<ShortStr>, ApiError> {
        map.get(k).and_then(Value::as_str).map(short).transpose()
    };
    let small = |k: &str| map.get(k).and_then(Value::as_u64).map(|n| n.min(255) as u8);
    Ok(amqp_codec::BasicProperties {
        content_type: text("content_type")?,
        content_encoding: text("content_encoding")?,
        headers: match map.get("headers") {
            None | Some(Value::Null) => None,
            Some(h) => Some(json_to_table(h).map_err(ApiError::bad_request)?),
        },
        delivery_mode: small("delivery_mode"),
        priority: small("priority"),
        correlation_id: text("correlation_id")?,
        reply_to: text("reply_to")?,
        expiration: text("expiration")?,
        message_id: text("message_id")?,
        timestamp: map.get("timestamp").and_then(Value::as_u64),
        kind: text("type")?,
        user_id: text("user_id")?,
        app_id: text("app_id")?,
        cluster_id: None,
    })
}

fn properties_to_json(p: &amqp_codec::BasicProperties) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_owned(), v);
        }
    };
    let s = |x: &Option<ShortStr>| x.as_ref().map(|v| json!(v.as_str()));
    put("content_type", s(&p.content_type));
    put("content_encoding", s(&p.content_encoding));
    put(
        "headers",
        p.headers.as_ref().map(crate::json::table_to_json),
    );
    put("delivery_mode", p.delivery_mode.map(|v| json!(v)));
    put("priority", p.priority.map(|v| json!(v)));
    put("correlation_id", s(&p.correlation_id));
    put("reply_to", s(&p.reply_to));
    put("expiration", s(&p.expiration));
    put("message_id", s(&p.message_id));
    put("timestamp", p.timestamp.map(|v| json!(v)));
    put("type", s(&p.kind));
    put("user_id", s(&p.user_id));
    put("app_id", s(&p.app_id));
    Value::Object(m)
}

/// `POST /api/exchanges/{vhost}/{name}/publish`: publishes as the caller
/// (who needs write permission on the exchange); answers whether it was routed.
/// `POST /api/exchanges/{vhost}/{name}/route` with `routing_key` (and
/// optionally `headers`): a dry run of routing (Warren's, for its UI's
/// "why didn't my message arrive?"), answered as `{routed, queues, hops}`,
/// each hop `{exchange, bindings, alternate_exchange}` with the bindings
/// that match in the API's binding shape. Publishes and counts nothing;
/// anyone who sees the vhost may ask.
async fn trace_route(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    let name = exchange_name(&name);
    let body = body_map(body);
    let routing_key = body
        .get("routing_key")
        .and_then(Value::as_str)
        .unwrap_or("");
    let headers = match body.get("headers") {
        None | Some(Value::Null) => None,
        Some(h) => Some(json_to_table(h).map_err(ApiError::bad_request)?),
    };
    let trace = v
        .router
        .read()
        .trace(name, routing_key, headers.as_ref())
        .map_err(|e| {
            if matches!(e, exchange::ExchangeError::ExchangeNotFound { .. }) {
                ApiError::not_found()
            } else {
                ApiError::bad_request(e.to_string())
            }
        })?;
    let hops: Vec<Value> = trace
        .hops
        .iter()
        .map(|h| {
            json!({
                "exchange": h.exchange.as_str(),
                "bindings": h.matched.iter().map(|d| binding(v.name(), d)).collect::<Vec<_>>(),
                "alternate_exchange": h.alternate.as_ref().map(ShortStr::as_str),
            })
        })
        .collect();
    ok(json!({
        "routed": !trace.queues.is_empty(),
        "queues": trace.queues.iter().map(ShortStr::as_str).collect::<Vec<_>>(),
        "hops": hops,
    }))
}

async fn publish_message(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    let name = exchange_name(&name).to_owned();
    caller.require_access(&b, v.name(), Resource::Exchange, &name, Access::Write)?;
    let body = body_map(body);
    let routing_key = body
        .get("routing_key")
        .and_then(Value::as_str)
        .unwrap_or("");
    let payload = body.get("payload").and_then(Value::as_str).unwrap_or("");
    let payload = match body.get("payload_encoding").and_then(Value::as_str) {
        None | Some("string") => bytes::Bytes::from(payload.to_owned().into_bytes()),
        Some("base64") => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(payload)
                .map(bytes::Bytes::from)
                .map_err(|e| ApiError::bad_request(format!("payload is not base64: {e}")))?
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "payload_encoding '{other}' (string or base64)"
            )));
        }
    };
    let props = properties_from_json(body.get("properties").unwrap_or(&Value::Null))?;
    // The checks basic.publish makes: a validated user-id, topic permissions.
    crate::vhost::check_user_id(
        props.user_id.as_ref().map(ShortStr::as_str),
        &caller.name,
        &b.auth,
    )?;
    v.check_topic(
        &b.auth,
        &caller.name,
        &name,
        routing_key,
        crate::auth::Access::Write,
    )?;
    let headers = props.headers.clone();
    let header = amqp_codec::ContentHeader {
        class_id: amqp_codec::class_id::BASIC,
        weight: 0,
        body_size: payload.len() as u64,
        properties: props
            .to_raw()
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
    };
    let (exchange, routing_key) = (short(&name)?, short(routing_key)?);
    let mut routed = exchange::Routed::default();
    let mut fx = queue_store::Effects::default();
    let published = v.enqueue(
        crate::vhost::Publish {
            exchange: &exchange,
            routing_key: &routing_key,
            mandatory: false,
            header,
            headers,
            body: payload,
            publisher: crate::trace::Party {
                connection: "management API",
                channel: 0,
                user: &caller.name,
            },
        },
        &mut routed,
        &mut fx,
    )?;
    if published.wrote {
        b.store.commit().await?;
    }
    ok(json!({"routed": !published.unroutable}))
}

/// `POST /api/queues/{vhost}/{name}/get`: takes up to `count` messages with
/// RabbitMQ's `ackmode` (`ack_requeue_true` puts them back, redelivered;
/// `ack_requeue_false` removes them; `reject_requeue_false` dead-letters).
async fn get_messages(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    caller.require_access(&b, v.name(), Resource::Queue, &name, Access::Read)?;
    let local = v.find_queue(&name);
    if let Some(q) = &local {
        not_exclusive(q, &vhost)?;
    }
    let body = body_map(body);
    // (rabbitmqadmin sends numbers as strings; RabbitMQ parses either.)
    let int = |field: &str| {
        match body.get(field) {
            None | Some(Value::Null) => Some(None),
            Some(Value::Number(n)) => n.as_u64().map(Some),
            Some(Value::String(s)) => s.trim().parse::<u64>().ok().map(Some),
            Some(_) => None,
        }
        .ok_or_else(|| ApiError::bad_request(format!("{field} must be a non-negative integer")))
    };
    let count = int("count")?.unwrap_or(1);
    let truncate = int("truncate")?;
    let ackmode = body
        .get("ackmode")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("Mandatory fields missing: ackmode"))?;
    let requeue = match ackmode {
        "ack_requeue_true" | "reject_requeue_true" => true,
        "ack_requeue_false" | "reject_requeue_false" => false,
        other => return Err(ApiError::bad_request(format!("invalid ackmode '{other}'"))),
    };
    let reject = ackmode.starts_with("reject");
    let got = GotMessage {
        truncate,
        encoding: body
            .get("encoding")
            .and_then(Value::as_str)
            .unwrap_or("auto")
            .to_owned(),
    };
    let how = if requeue {
        crate::queue::Settle::Requeue
    } else if reject {
        crate::queue::Settle::Reject
    } else {
        crate::queue::Settle::Ack
    };
    let Some(q) = local else {
        // A queue another node holds: taken and settled there, as
        // `basic.get` from a client here does.
        let (remote, peers) = on_another_node(&b, &v, &name)?;
        let mut taken = Vec::new();
        for _ in 0..count {
            match peers.get(&remote.home, v.name(), &remote.name, true).await {
                Ok(Some(d)) => taken.push(d),
                Ok(None) => break,
                Err(e) => return Err(remote.home_down(v.name(), "get", &e).into()),
            }
        }
        let seqs = taken.iter().map(|d| d.seq).collect();
        peers.settle(&remote.home, v.name(), &remote.name, remote.id, seqs, how);
        let mut out = Vec::new();
        for d in &taken {
            let props = amqp_codec::ContentHeader::decode(&d.header)
                .ok()
                .and_then(|h| h.properties.decode().ok())
                .map_or(Value::Null, |p| properties_to_json(&p));
            out.push(got.json(
                &d.body,
                props,
                d.redelivered,
                &d.exchange,
                &d.routing_key,
                d.remaining,
            ));
        }
        return ok(Value::Array(out));
    };
    let mut fx = queue_store::Effects::default();
    let mut taken = Vec::new();
    for _ in 0..count {
        match q.get(true, &mut fx) {
            Some(d) => taken.push(d),
            None => break,
        }
    }
    q.settle(how, &mut taken.iter().map(|d| d.seq), requeue, &mut fx);
    let mut out = Vec::new();
    for d in &taken {
        let Some(m) = crate::queue::load_off_worker(&d.message, &b.store).await else {
            continue;
        };
        let props = m
            .header
            .properties
            .decode()
            .map(|p| properties_to_json(&p))
            .unwrap_or(Value::Null);
        out.push(got.json(
            &m.body,
            props,
            d.redelivered,
            &m.exchange,
            &m.routing_key,
            d.remaining as u32,
        ));
    }
    v.apply(&mut fx);
    ok(Value::Array(out))
}

/// How `POST .../get` shows the messages it took.
struct GotMessage {
    /// At most this many octets of each body.
    truncate: Option<u64>,
    /// `auto` (text when it is UTF-8) or `base64`.
    encoding: String,
}

impl GotMessage {
    /// One message, as RabbitMQ's API shows it.
    fn json(
        &self,
        body: &bytes::Bytes,
        properties: Value,
        redelivered: bool,
        exchange: &str,
        routing_key: &str,
        remaining: u32,
    ) -> Value {
        let shown = match self.truncate {
            Some(n) => body.slice(..body.len().min(usize::try_from(n).unwrap_or(usize::MAX))),
            None => body.clone(),
        };
        let (payload, payload_encoding) =
            match (self.encoding.as_str(), std::str::from_utf8(&shown)) {
                ("auto", Ok(text)) => (text.to_owned(), "string"),
                _ => {
                    use base64::Engine as _;
                    (
                        base64::engine::general_purpose::STANDARD.encode(&shown),
                        "base64",
                    )
                }
            };
        json!({
            "payload_bytes": body.len(),
            "redelivered": redelivered,
            "exchange": exchange,
            "routing_key": routing_key,
            "message_count": remaining,
            "properties": properties,
            "payload": payload,
            "payload_encoding": payload_encoding,
        })
    }
}

/// `GET /api/aliveness-test/{vhost}`: declares `aliveness-test`, publishes
/// to it and gets the message back, as RabbitMQ does.
async fn aliveness_test(State(b): Shared, caller: Caller, Path(vhost): Path<String>) -> ApiResult {
    caller.require_monitoring()?;
    let v = visible_vhost(&b, &caller, &vhost)?;
    let name = ShortStr::from_static("aliveness-test");
    let q = match v.find_queue(&name) {
        Some(q) => q,
        None => {
            v.declare_queue(
                name.clone(),
                false,
                false,
                None,
                QueueArgs::default(),
                amqp_codec::FieldTable::new(),
            )
            .await?
        }
    };
    let header = amqp_codec::ContentHeader {
        class_id: amqp_codec::class_id::BASIC,
        weight: 0,
        body_size: 15,
        properties: amqp_codec::BasicProperties::default()
            .to_raw()
            .map_err(ApiError::internal)?,
    };
    let mut routed = exchange::Routed::default();
    let mut fx = queue_store::Effects::default();
    let empty = ShortStr::from_static("");
    v.enqueue(
        crate::vhost::Publish {
            exchange: &empty,
            routing_key: &name,
            mandatory: false,
            header,
            headers: None,
            body: bytes::Bytes::from_static(b"aliveness-test!"),
            publisher: crate::trace::Party {
                connection: "management API",
                channel: 0,
                user: "",
            },
        },
        &mut routed,
        &mut fx,
    )?;
    let got = q.get(false, &mut fx);
    v.apply(&mut fx);
    match got {
        Some(_) => ok(json!({"status": "ok"})),
        None => Err(ApiError::internal(
            "the aliveness-test message did not come back",
        )),
    }
}

/// A failed health check: 503 with RabbitMQ's body.
fn check_failed(body: Value) -> ApiResult {
    Ok((StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response())
}

/// `rabbitmq-diagnostics check_virtual_hosts`: every vhost is running.
/// (A vhost here runs from its declaration on: none is ever down alone.)
/// `/api/health/checks/virtual-hosts`: every vhost can take messages. A
/// store whose writer failed (a full disk, an I/O error) takes none until a
/// restart, as RabbitMQ's vhosts are down when their message store crashed:
/// then every vhost is reported down, with the reason.
async fn virtual_hosts_check(State(b): Shared, _caller: Caller) -> ApiResult {
    let Some(failure) = b.store.failure() else {
        return ok(json!({"status": "ok"}));
    };
    let down: Vec<String> = b
        .vhost_list()
        .iter()
        .map(|v| v.name().to_string())
        .collect();
    Ok((
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "status": "failed",
            "reason": format!(
                "the message store on node {} failed ({failure}): restart the node; down: {}",
                b.config.node_name,
                down.join(", ")
            ),
            "virtual-hosts": down,
        })),
    )
        .into_response())
}

/// This node's listeners, as RabbitMQ names their protocols (its
/// inter-node listener, `clustering`, in a cluster).
fn local_listeners(b: &Broker) -> Vec<(&'static str, u16)> {
    let mut out: Vec<(&'static str, u16)> = b
        .listeners
        .get()
        .map(|l| l.iter().map(|(p, a)| (*p, a.port())).collect())
        .unwrap_or_default();
    if let Some(peers) = b.peers.get() {
        let me = peers
            .members()
            .into_iter()
            .find(|m| m.name == b.config.node_name);
        if let Some(port) = me.and_then(|m| m.cluster_addr.rsplit_once(':')?.1.parse().ok()) {
            out.push(("clustering", port));
        }
    }
    out
}

/// `rabbitmq-diagnostics check_port_listener`: this node listens on `port`.
async fn port_listener_check(
    State(b): Shared,
    _caller: Caller,
    Path(port): Path<String>,
) -> ApiResult {
    let port: u16 = port
        .parse()
        .map_err(|_| ApiError::bad_request("Invalid port"))?;
    let listeners = local_listeners(&b);
    if listeners.iter().any(|(_, p)| *p == port) {
        return ok(json!({"status": "ok", "port": port}));
    }
    check_failed(json!({
        "status": "failed",
        "reason": "No active listener",
        "missing": port,
        "ports": listeners.iter().map(|(_, p)| *p).collect::<Vec<_>>(),
    }))
}

/// RabbitMQ's spellings of a protocol, as its `protocol-listener` check
/// takes them.
fn normalize_protocol(p: &str) -> String {
    let p = p.to_lowercase();
    match p.as_str() {
        "amqp091" | "amqp0.9.1" | "amqp0-9-1" | "amqp0_9_1" => "amqp".into(),
        "amqps" => "amqp/ssl".into(),
        "http1" | "http1.1" | "http_api" | "management" | "management_ui" | "ui" => "http".into(),
        "prometheus" => "http/prometheus".into(),
        "cli" | "distribution" => "clustering".into(),
        _ => p,
    }
}

/// `rabbitmq-diagnostics check_protocol_listener`: this node listens for
/// `protocol`.
async fn protocol_listener_check(
    State(b): Shared,
    _caller: Caller,
    Path(protocol): Path<String>,
) -> ApiResult {
    let protocol = normalize_protocol(&protocol);
    let listeners = local_listeners(&b);
    if listeners.iter().any(|(p, _)| *p == protocol) {
        return ok(json!({"status": "ok", "protocol": protocol}));
    }
    check_failed(json!({
        "status": "failed",
        "reason": "No active listener",
        "missing": protocol,
        "protocols": listeners.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
    }))
}

/// The management UI's extensions: none.
async fn extensions(_caller: Caller) -> ApiResult {
    ok(json!([]))
}

/// `GET /api/auth`: the login settings the management UI reads; Warren
/// has no OAuth 2 login (basic authentication only).
async fn auth_settings() -> ApiResult {
    ok(json!({"oauth_enabled": false, "enable_uaa": false}))
}

/// `GET /api/feature-flags`: RabbitMQ 3.10's flags, each enabled (Warren
/// behaves as a 3.10 node with all of them on).
async fn feature_flags(caller: Caller) -> ApiResult {
    caller.require_monitoring()?;
    let flags = [
        (
            "classic_mirrored_queue_version",
            "rabbit",
            "Classic mirrored queue versions",
        ),
        (
            "drop_unroutable_metric",
            "rabbitmq_management_agent",
            "Unroutable drops counted in stats",
        ),
        (
            "empty_basic_get_metric",
            "rabbitmq_management_agent",
            "Empty basic.get counted in stats",
        ),
        (
            "implicit_default_bindings",
            "rabbit",
            "Default exchange bindings are implicit",
        ),
        (
            "maintenance_mode_status",
            "rabbit",
            "Maintenance mode status",
        ),
        ("quorum_queue", "rabbit", "Quorum queues"),
        ("stream_queue", "rabbit", "Stream queues"),
        ("user_limits", "rabbit", "Per-user limits"),
        ("virtual_host_metadata", "rabbit", "Virtual host metadata"),
    ];
    ok(Value::Array(
        flags
            .iter()
            .map(|(name, by, desc)| {
                json!({"name": name, "desc": desc, "doc_url": "", "provided_by": by, "stability": "stable", "state": "enabled"})
            })
            .collect(),
    ))
}

/// RabbitMQ's global runtime parameters: `internal_cluster_id` (the id
/// `rabbitmq_identity_info` carries), and `cluster_name` in a cluster.
fn global_parameter_list(b: &Broker) -> Vec<Value> {
    let cluster = b.peers.get().map(|p| p.cluster_name());
    let id = crate::metrics::IdentityLabels::new(
        &b.config.node_name,
        cluster.as_deref().unwrap_or(&b.config.node_name),
    );
    let mut out = Vec::new();
    if let Some(name) = cluster {
        out.push(json!({"name": "cluster_name", "value": name}));
    }
    out.push(json!({"name": "internal_cluster_id", "value": id.rabbitmq_cluster_permanent_id}));
    out
}

async fn global_parameters(State(b): Shared, caller: Caller, Query(q): Listing) -> ApiResult {
    caller.require_monitoring()?;
    listing(&q, global_parameter_list(&b))
}

async fn global_parameter(State(b): Shared, caller: Caller, Path(name): Path<String>) -> ApiResult {
    caller.require_monitoring()?;
    global_parameter_list(&b)
        .into_iter()
        .find(|p| p["name"] == name.as_str())
        .map_or_else(|| Err(ApiError::not_found()), ok)
}

/// Runtime parameters: Warren has no component that keeps any (no
/// federation or shovel; vhost limits are under `/api/vhost-limits`).
async fn no_parameters(caller: Caller) -> ApiResult {
    caller.require_monitoring()?;
    ok(json!([]))
}

async fn no_parameter(_caller: Caller) -> ApiResult {
    Err(ApiError::not_found())
}

/// `PUT /api/parameters/{component}/...`: no such component, in RabbitMQ's
/// words for a plugin that is not enabled.
async fn unknown_component(
    caller: Caller,
    Path((component, _, _)): Path<(String, String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    Err(ApiError::bad_request(format!(
        "Validation failed\n\ncomponent {component} not found\n"
    )))
}

fn topic_permission_json(
    (user, vhost, exchange, write, read): &(String, String, String, String, String),
) -> Value {
    json!({"user": user, "vhost": vhost, "exchange": exchange, "write": write, "read": read})
}

/// Topic permissions matching `keep`, as RabbitMQ lists them.
fn topic_permissions_where(
    b: &Broker,
    keep: impl Fn(&(String, String, String, String, String)) -> bool,
) -> Value {
    Value::Array(
        b.auth
            .topic_permissions()
            .iter()
            .filter(|p| keep(p))
            .map(topic_permission_json)
            .collect(),
    )
}

async fn list_topic_permissions(State(b): Shared, caller: Caller) -> ApiResult {
    caller.require_admin()?;
    ok(topic_permissions_where(&b, |_| true))
}

/// A user's topic permissions in a vhost (404 if it has none there).
async fn get_topic_permissions(
    State(b): Shared,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    let found = topic_permissions_where(&b, |p| p.0 == user && p.1 == vhost);
    if found.as_array().is_none_or(Vec::is_empty) {
        return Err(ApiError::not_found());
    }
    ok(found)
}

/// Sets a user's topic permissions on one exchange of a vhost:
/// `{"exchange", "write", "read"}`, all required.
async fn put_topic_permissions(
    State(b): Shared,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    caller.require_admin()?;
    if b.vhost(&vhost).is_none() || b.auth.user(&user).is_none() {
        return Err(ApiError::not_found());
    }
    let body = body_map(body);
    let missing: Vec<&str> = ["exchange", "write", "read"]
        .into_iter()
        .filter(|k| !matches!(body.get(*k), Some(Value::String(_))))
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::bad_request(format!(
            "Mandatory fields missing: {}",
            missing.join(", ")
        )));
    }
    let field = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or_default();
    let exchange = field("exchange");
    let was_new = !b
        .auth
        .topic_permissions()
        .iter()
        .any(|p| p.0 == user && p.1 == vhost && p.2 == exchange);
    b.set_topic_permissions(&user, &vhost, exchange, field("write"), field("read"))
        .await?;
    created(was_new)
}

/// Clears every topic permission of a user in a vhost.
async fn delete_topic_permissions(
    State(b): Shared,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult {
    caller.require_admin()?;
    let theirs: Vec<String> = b
        .auth
        .topic_permissions()
        .into_iter()
        .filter(|p| p.0 == user && p.1 == vhost)
        .map(|p| p.2)
        .collect();
    if theirs.is_empty() {
        return Err(ApiError::not_found());
    }
    for exchange in theirs {
        b.clear_topic_permissions(&user, &vhost, &exchange).await?;
    }
    no_content()
}

async fn vhost_topic_permissions(
    State(b): Shared,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    if b.vhost(&vhost).is_none() {
        return Err(ApiError::not_found());
    }
    ok(topic_permissions_where(&b, |p| p.1 == vhost))
}

async fn user_topic_permissions(
    State(b): Shared,
    caller: Caller,
    Path(user): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    if b.auth.user(&user).is_none() {
        return Err(ApiError::not_found());
    }
    ok(topic_permissions_where(&b, |p| p.0 == user))
}

/// A vhost's connections (every node's), as `/api/connections` lists them.
async fn vhost_connections(
    State(b): Shared,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Listing,
) -> ApiResult {
    visible_vhost(&b, &caller, &vhost)?;
    let mut items = cluster_listing(&b, crate::peers::Listing::Connections).await;
    items.retain(|c| may_see_user(&caller, c) && c["vhost"] == vhost.as_str());
    listing(&q, items)
}

/// A vhost's channels (every node's), as `/api/channels` lists them.
async fn vhost_channels(
    State(b): Shared,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Listing,
) -> ApiResult {
    visible_vhost(&b, &caller, &vhost)?;
    let mut items = cluster_listing(&b, crate::peers::Listing::Channels).await;
    items.retain(|c| may_see_user(&caller, c) && c["vhost"] == vhost.as_str());
    listing(&q, items)
}

/// A connection's channels.
async fn connection_channels(
    State(b): Shared,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Listing,
) -> ApiResult {
    find_connection(&b, &caller, &name).await?;
    let mut items = cluster_listing(&b, crate::peers::Listing::Channels).await;
    items.retain(|c| c["connection_details"]["name"] == name.as_str());
    listing(&q, items)
}

/// One channel, named as `/api/channels` names it (`<connection> (<n>)`).
async fn get_channel(State(b): Shared, caller: Caller, Path(name): Path<String>) -> ApiResult {
    cluster_listing(&b, crate::peers::Listing::Channels)
        .await
        .into_iter()
        .find(|c| c["name"] == name.as_str() && may_see_user(&caller, c))
        .map_or_else(|| Err(ApiError::not_found()), ok)
}

/// The bindings to queue `name` (the default exchange's among them).
async fn queue_bindings(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    let v = visible_vhost(&b, &caller, &vhost)?;
    if v.find_queue(&name).is_none() && v.find_remote_queue(&name).is_none() {
        return Err(ApiError::not_found());
    }
    let dest = exchange::Destination::Queue(short(&name)?);
    ok(Value::Array(
        all_bindings(&v)
            .iter()
            .filter(|bd| bd.destination == dest)
            .map(|bd| binding(v.name(), bd))
            .collect(),
    ))
}

/// The bindings of exchange `name`: from it (`source`) or to it.
fn exchange_bindings(
    b: &Broker,
    caller: &Caller,
    vhost: &str,
    name: &str,
    from: bool,
) -> ApiResult {
    let v = visible_vhost(b, caller, vhost)?;
    let name = exchange_name(name);
    if !v.router.read().exchanges().any(|x| x.name.as_str() == name) {
        return Err(ApiError::not_found());
    }
    let dest = exchange::Destination::Exchange(short(name)?);
    ok(Value::Array(
        all_bindings(&v)
            .iter()
            .filter(|bd| {
                if from {
                    bd.source.as_str() == name
                } else {
                    bd.destination == dest
                }
            })
            .map(|bd| binding(v.name(), bd))
            .collect(),
    ))
}

async fn exchange_bindings_source(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    exchange_bindings(&b, &caller, &vhost, &name, true)
}

async fn exchange_bindings_destination(
    State(b): Shared,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult {
    exchange_bindings(&b, &caller, &vhost, &name, false)
}
