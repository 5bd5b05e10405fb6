//! JSON shapes of the management API's objects, field for field as
//! RabbitMQ's management plugin writes them, and the conversion between JSON
//! and AMQP field tables (queue and exchange arguments, binding arguments).

use amqp_codec::{FieldTable, FieldValue, ShortStr};
use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::queue::QueueHandle;
use crate::vhost::VhostLimits;

/// A field table as JSON: numbers, strings, booleans, arrays, nested tables.
pub(crate) fn table_to_json(t: &FieldTable) -> Value {
    Value::Object(
        t.iter()
            .map(|(k, v)| (k.as_str().to_owned(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &FieldValue) -> Value {
    match v {
        FieldValue::Bool(b) => json!(b),
        FieldValue::I8(x) => json!(x),
        FieldValue::U8(x) => json!(x),
        FieldValue::I16(x) => json!(x),
        FieldValue::U16(x) => json!(x),
        FieldValue::I32(x) => json!(x),
        FieldValue::U32(x) => json!(x),
        FieldValue::I64(x) => json!(x),
        FieldValue::F32(x) => json!(x),
        FieldValue::F64(x) => json!(x),
        FieldValue::Decimal { scale, value } => {
            json!(f64::from(*value) / 10f64.powi(i32::from(*scale)))
        }
        FieldValue::LongStr(b) | FieldValue::ByteArray(b) => {
            json!(String::from_utf8_lossy(b))
        }
        FieldValue::Array(a) => Value::Array(a.iter().map(value_to_json).collect()),
        FieldValue::Timestamp(t) => json!(t),
        FieldValue::Table(t) => table_to_json(t),
        FieldValue::Void => Value::Null,
    }
}

/// JSON arguments as a field table, typed as RabbitMQ's API types them:
/// integers as `long`, other numbers as `double`, strings as `longstr`.
pub(crate) fn json_to_table(v: &Value) -> Result<FieldTable, String> {
    let mut t = FieldTable::new();
    match v {
        Value::Null => {}
        Value::Object(map) => {
            for (k, v) in map {
                let key = ShortStr::try_from(k.as_str())
                    .map_err(|_| format!("argument name too long: {k}"))?;
                t.insert(key, json_to_value(v)?);
            }
        }
        // rabbitmqadmin and some clients send `[]` for no arguments
        // (Erlang's empty proplist), which RabbitMQ accepts.
        Value::Array(items) if items.is_empty() => {}
        _ => return Err("arguments must be an object".into()),
    }
    Ok(t)
}

fn json_to_value(v: &Value) -> Result<FieldValue, String> {
    Ok(match v {
        Value::Null => FieldValue::Void,
        Value::Bool(b) => FieldValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => FieldValue::I64(i),
            None => FieldValue::F64(n.as_f64().ok_or("number out of range")?),
        },
        Value::String(s) => FieldValue::LongStr(Bytes::from(s.clone().into_bytes())),
        Value::Array(a) => {
            FieldValue::Array(a.iter().map(json_to_value).collect::<Result<_, _>>()?)
        }
        Value::Object(_) => FieldValue::Table(json_to_table(v)?),
    })
}

/// A user as `/api/users` lists it and definitions files hold it.
pub(crate) fn user(u: &crate::auth::User) -> Value {
    json!({
        "name": u.name,
        "password_hash": u.password_hash.clone().unwrap_or_default(),
        "hashing_algorithm": "rabbit_password_hashing_sha256",
        "tags": u.tags,
        "limits": {},
    })
}

/// A queue as `/api/queues` lists it.
pub(super) fn queue(vhost: &str, q: &QueueHandle, node: &str) -> Value {
    let counts = q.counters();
    let (ready, unacked) = (counts.ready, counts.unacked);
    let applied = q.policy.lock().clone();
    let mut out = json!({
        "name": q.name.as_str(),
        "vhost": vhost,
        "durable": q.durable,
        "auto_delete": q.auto_delete,
        "exclusive": q.exclusive_owner.is_some(),
        "arguments": table_to_json(&q.arguments),
        "type": q.kind().type_name(),
        "state": "running",
        "node": node,
        "messages": ready + unacked,
        "messages_ready": ready,
        "messages_unacknowledged": unacked,
        "message_bytes": counts.ready_bytes + counts.unacked_bytes,
        "message_bytes_ready": counts.ready_bytes,
        "message_bytes_unacknowledged": counts.unacked_bytes,
        "consumers": counts.consumers,
        "memory": counts.memory,
        "flow": q.flow.is_raised(),
        "policy": applied.policy,
        "operator_policy": applied.operator_policy,
        "effective_policy_definition": applied.definition,
        "exclusive_consumer_tag": null,
        "message_stats": message_stats(q.stats.snapshot()),
    });
    // Deliveries by kind, as RabbitMQ splits them.
    if let Some(stats) = out["message_stats"].as_object_mut() {
        q.stats
            .kinds
            .write_json(&crate::queue::DELIVERY_KINDS, stats);
    }
    // How the depth moved over the last sampling period (5 s).
    let [messages, ready_rate, unacked_rate] = q.stats.depth_rates();
    out["messages_details"] = json!({"rate": messages});
    out["messages_ready_details"] = json!({"rate": ready_rate});
    out["messages_unacknowledged_details"] = json!({"rate": unacked_rate});
    // RabbitMQ 3.10 shows the same figure under both names.
    let utilisation = q.stats.utilisation();
    out["consumer_utilisation"] = json!(utilisation);
    out["consumer_capacity"] = json!(utilisation);
    if let Some(at) = q.stats.idle_since() {
        out["idle_since"] = json!(iso8601_ms(at));
    }
    out
}

/// A time (ms since the epoch) as RabbitMQ 3.10 writes `idle_since`:
/// `2026-12-04T17:12:28.945+00:00`.
pub(crate) fn iso8601_ms(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}+00:00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// RabbitMQ's `message_stats` object from counts and rates of
/// (publish, deliver_get, ack).
pub(crate) fn message_stats((counts, rates): ([u64; 3], [f64; 3])) -> Value {
    let mut m = serde_json::Map::new();
    for (i, key) in ["publish", "deliver_get", "ack"].iter().enumerate() {
        let (count, rate) = (
            counts.get(i).copied().unwrap_or(0),
            rates.get(i).copied().unwrap_or(0.0),
        );
        m.insert((*key).to_owned(), json!(count));
        m.insert(format!("{key}_details"), json!({"rate": rate}));
    }
    Value::Object(m)
}

/// An exchange as `/api/exchanges` lists it.
pub(super) fn exchange(vhost: &str, x: &exchange::ExchangeDef) -> Value {
    json!({
        "name": x.name.as_str(),
        "vhost": vhost,
        "type": x.kind.as_str(),
        "durable": x.durable,
        "auto_delete": x.auto_delete,
        "internal": x.internal,
        "arguments": table_to_json(&x.arguments),
        "user_who_performed_action": "",
    })
}

/// A binding as `/api/bindings` lists it, with the `properties_key` that
/// addresses it.
pub(super) fn binding(vhost: &str, b: &exchange::BindingDef) -> Value {
    let (destination, kind) = match &b.destination {
        exchange::Destination::Queue(q) => (q.as_str(), "queue"),
        exchange::Destination::Exchange(x) => (x.as_str(), "exchange"),
    };
    let properties_key = properties_key(b);
    json!({
        "source": b.source.as_str(),
        "vhost": vhost,
        "destination": destination,
        "destination_type": kind,
        "routing_key": b.routing_key.as_str(),
        "arguments": table_to_json(&b.arguments),
        "properties_key": properties_key,
    })
}

/// RabbitMQ's `properties_key` of a binding, the last segment of its URL:
/// the routing key quoted as a form value (`~` and `%` escaped; `~` alone
/// for an empty key without arguments), then, when the binding has
/// arguments, `~` and a hash of them. Two bindings between the same pair
/// differ in routing key or arguments, so they differ here.
pub(super) fn properties_key(b: &exchange::BindingDef) -> String {
    let key = quote_plus(b.routing_key.as_str());
    match arguments_hash(&b.arguments) {
        None if key.is_empty() => "~".to_owned(),
        None => key,
        Some(hash) => format!("{key}~{hash}"),
    }
}

/// Whether `props` (a binding URL's last segment, percent-decoded once by
/// the router) names `b`. Parsed as RabbitMQ parses it, so both the listed
/// `properties_key` and the same key percent-encoded once more work.
pub(super) fn names_binding(props: &str, b: &exchange::BindingDef) -> bool {
    let (key, hash) = match props.split_once('~') {
        Some((key, hash)) => (key, (!hash.is_empty()).then_some(hash)),
        None => (props, None),
    };
    let key = key.replace('+', " ");
    let key = percent_encoding::percent_decode_str(&key).decode_utf8_lossy();
    key == b.routing_key.as_str() && hash.map(str::to_owned) == arguments_hash(&b.arguments)
}

/// `application/x-www-form-urlencoded` quoting: letters, digits and `-_.`
/// stay, a space becomes `+`, every other byte `%XX`.
fn quote_plus(s: &str) -> String {
    const FORM: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.');
    percent_encoding::utf8_percent_encode(s, FORM)
        .to_string()
        .replace("%20", "+")
}

/// A short stable digest of binding arguments (FNV-1a over their wire
/// encoding), or `None` without arguments. RabbitMQ hashes the Erlang term;
/// only distinctness matters, as clients take the key from the listing.
fn arguments_hash(args: &FieldTable) -> Option<String> {
    if args.is_empty() {
        return None;
    }
    let mut buf = bytes::BytesMut::new();
    // An unencodable table cannot have come off the wire; hash what there is.
    let _ = args.encode(&mut buf);
    let hash = buf.iter().fold(0x811c_9dc5_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    Some(format!("{hash:08x}"))
}

/// A vhost's limits as RabbitMQ writes them (`{"max-connections": 10}`);
/// only the limits that are set appear.
pub(crate) fn limits_json(l: &VhostLimits) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(n) = l.max_connections {
        out.insert(VhostLimits::CONNECTIONS.into(), json!(n));
    }
    if let Some(n) = l.max_queues {
        out.insert(VhostLimits::QUEUES.into(), json!(n));
    }
    out
}

/// Applies one limit to `limits`, validated as RabbitMQ validates it: a
/// known name and an integer; a negative value lifts the limit.
pub(crate) fn set_limit(limits: &mut VhostLimits, name: &str, value: &Value) -> Result<(), String> {
    let n = value
        .as_i64()
        .ok_or_else(|| format!("limit '{name}' must be an integer, not {value}"))?;
    let n = usize::try_from(n).ok();
    match name {
        VhostLimits::CONNECTIONS => limits.max_connections = n,
        VhostLimits::QUEUES => limits.max_queues = n,
        _ => {
            return Err(format!(
                "unknown vhost limit '{name}' (known: {}, {})",
                VhostLimits::CONNECTIONS,
                VhostLimits::QUEUES
            ));
        }
    }
    Ok(())
}

/// Limits from a whole JSON object (`rabbitmqctl set_vhost_limits`, a
/// `vhost-limits` runtime parameter): the ones it does not name are lifted.
pub(crate) fn limits_from_json(v: &Value) -> Result<VhostLimits, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("vhost limits must be a JSON object, not {v}"))?;
    let mut limits = VhostLimits::default();
    for (name, value) in obj {
        set_limit(&mut limits, name, value)?;
    }
    Ok(limits)
}

/// Reads an optional boolean field of a request body.
pub(super) fn flag(body: &Map<String, Value>, key: &str, default: bool) -> Result<bool, String> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" || s == "false" => Ok(s == "true"),
        Some(_) => Err(format!("{key} must be a boolean")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(key: &'static str, args: FieldTable) -> exchange::BindingDef {
        exchange::BindingDef {
            source: ShortStr::from_static("x"),
            destination: exchange::Destination::Queue(ShortStr::from_static("q")),
            routing_key: ShortStr::from_static(key),
            arguments: args,
        }
    }

    #[test]
    fn properties_keys_quote_the_routing_key_and_tell_arguments_apart() {
        let plain = bound("order.#", FieldTable::new());
        assert_eq!(properties_key(&plain), "order.%23");
        assert_eq!(properties_key(&bound("", FieldTable::new())), "~");
        assert_eq!(
            properties_key(&bound("a b~c", FieldTable::new())),
            "a+b%7Ec"
        );

        let mut args = FieldTable::new();
        args.insert(ShortStr::from_static("x-match"), FieldValue::from("all"));
        let with_args = bound("order.#", args.clone());
        let key = properties_key(&with_args);
        assert!(key.starts_with("order.%23~"), "{key}");
        assert_ne!(key, properties_key(&plain));
        assert_eq!(key, properties_key(&bound("order.#", args)), "stable");

        // The key names its binding only, as listed or decoded once more.
        for (props, b) in [(&key, &with_args), (&properties_key(&plain), &plain)] {
            assert!(names_binding(props, b), "{props}");
            let decoded = percent_encoding::percent_decode_str(props).decode_utf8_lossy();
            assert!(names_binding(&decoded, b), "{decoded}");
        }
        assert!(!names_binding(&key, &plain));
        assert!(!names_binding("order.%23", &with_args));
        assert!(names_binding("~", &bound("", FieldTable::new())));
        assert!(names_binding("a+b%7Ec", &bound("a b~c", FieldTable::new())));
    }

    #[test]
    fn idle_since_is_written_as_rabbitmq_writes_it() {
        assert_eq!(iso8601_ms(0), "1970-01-01T00:00:00.000+00:00");
        // 2026-12-04 17:12:28.945 UTC.
        assert_eq!(
            iso8601_ms(1_796_404_348_945),
            "2026-12-04T17:12:28.945+00:00"
        );
    }

    #[test]
    fn arguments_round_trip_through_json() {
        let v = json!({"x-message-ttl": 60000, "x-dead-letter-exchange": "dlx", "x-ratio": 0.5, "x-flag": true, "x-list": [1, "a"]});
        let t = json_to_table(&v).unwrap_or_default();
        assert_eq!(t.get("x-message-ttl"), Some(&FieldValue::I64(60000)));
        assert_eq!(
            t.get("x-dead-letter-exchange").and_then(FieldValue::as_str),
            Some("dlx")
        );
        assert_eq!(table_to_json(&t), v);
        assert!(json_to_table(&json!([1])).is_err());
    }
}
