//! The firehose: RabbitMQ's `amq.rabbitmq.trace`. With tracing on for a
//! vhost (`warrenctl trace_on -p <vhost>`, or the management API's vhost
//! `tracing` flag), every message published in it is copied to the vhost's
//! `amq.rabbitmq.trace` exchange with routing key `publish.<exchange>`, and
//! every delivery (to a consumer or `basic.get`) with `deliver.<queue>`. The
//! copies carry RabbitMQ's trace headers and the original body.
//!
//! Off (the default), tracing costs one relaxed atomic load per publish and
//! per delivery. Copies made while a queue is locked (deliveries) wait in
//! [`Tracer`] until the vhost applies the operation's effects, so routing
//! them never locks a queue twice. Messages published to the trace exchange
//! itself are never traced (no copies of copies).

use std::sync::atomic::{AtomicBool, Ordering};

use amqp_codec::{BasicProperties, ContentHeader, FieldTable, FieldValue, ShortStr};
use bytes::Bytes;
use parking_lot::Mutex;
use queue_store::Message;

/// The trace exchange every vhost has (topic, durable, internal).
pub const TRACE_EXCHANGE: &str = "amq.rabbitmq.trace";

/// A copy for the trace exchange.
#[derive(Debug, Clone)]
pub struct TraceCopy {
    /// `publish.<exchange>` or `deliver.<queue>`.
    pub routing_key: ShortStr,
    /// Only the `headers` property, holding the trace headers.
    pub header: ContentHeader,
    /// The traced message's body.
    pub body: Bytes,
}

/// Who published or received a traced message.
#[derive(Debug, Clone, Copy)]
pub struct Party<'a> {
    /// The connection's name (`peer -> local`).
    pub connection: &'a str,
    /// The channel number.
    pub channel: u16,
    /// The authenticated user.
    pub user: &'a str,
}

/// A vhost's tracing switch and the copies waiting to be routed.
#[derive(Debug)]
pub struct Tracer {
    on: AtomicBool,
    pending: Mutex<Vec<TraceCopy>>,
    /// This node's name, which every copy's `node` header carries.
    node: String,
}

impl Default for Tracer {
    fn default() -> Tracer {
        Tracer::new(crate::config::NODE_NAME)
    }
}

fn s(v: &'static str) -> ShortStr {
    ShortStr::from_static(v)
}

fn long(v: &str) -> FieldValue {
    FieldValue::LongStr(Bytes::copy_from_slice(v.as_bytes()))
}

impl Tracer {
    /// Off, on node `node`.
    pub fn new(node: &str) -> Tracer {
        Tracer {
            on: AtomicBool::new(false),
            pending: Mutex::default(),
            node: node.to_owned(),
        }
    }

    /// Whether tracing is on.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Turns tracing on or off.
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
        if !on {
            self.pending.lock().clear();
        }
    }

    /// Records a `publish.<exchange>` copy of a message published in
    /// `vhost` (with `routing_keys`: its key and CC/BCC keys) and routed to
    /// `routed_queues`.
    pub fn published(
        &self,
        vhost: &str,
        message: &Message,
        routing_keys: Vec<FieldValue>,
        routed_queues: Vec<FieldValue>,
        party: Party<'_>,
    ) {
        if message.exchange.as_str() == TRACE_EXCHANGE {
            return;
        }
        let mut headers = message_table(message, routing_keys, &self.node);
        headers.insert(s("vhost"), long(vhost));
        headers.insert(s("connection"), long(party.connection));
        headers.insert(s("channel"), FieldValue::I32(i32::from(party.channel)));
        headers.insert(s("user"), long(party.user));
        headers.insert(s("routed_queues"), FieldValue::Array(routed_queues));
        self.push("publish.", &message.exchange, headers, message);
    }

    /// Records a `deliver.<queue>` copy of a delivery from `queue`.
    pub fn delivered(
        &self,
        vhost: &str,
        queue: &str,
        message: &Message,
        redelivered: bool,
        party: Party<'_>,
    ) {
        if message.exchange.as_str() == TRACE_EXCHANGE {
            return;
        }
        let mut headers = message_table(message, routing_keys_of(message), &self.node);
        headers.insert(s("redelivered"), FieldValue::I32(i32::from(redelivered)));
        headers.insert(s("vhost"), long(vhost));
        headers.insert(s("connection"), long(party.connection));
        headers.insert(s("channel"), FieldValue::I32(i32::from(party.channel)));
        headers.insert(s("user"), long(party.user));
        self.push("deliver.", queue, headers, message);
    }

    /// The copies waiting to be routed.
    pub fn take(&self) -> Vec<TraceCopy> {
        let mut pending = self.pending.lock();
        if pending.is_empty() {
            Vec::new()
        } else {
            std::mem::take(&mut *pending)
        }
    }

    fn push(&self, prefix: &str, suffix: &str, headers: FieldTable, message: &Message) {
        let Ok(routing_key) = ShortStr::try_from(format!("{prefix}{suffix}")) else {
            // (A 255-octet queue name leaves no room for the prefix.)
            return;
        };
        let properties = BasicProperties {
            headers: Some(headers),
            ..BasicProperties::default()
        };
        let Ok(properties) = properties.to_raw() else {
            return;
        };
        self.pending.lock().push(TraceCopy {
            routing_key,
            header: ContentHeader {
                class_id: message.header.class_id,
                weight: 0,
                body_size: message.body.len() as u64,
                properties,
            },
            body: message.body.clone(),
        });
    }
}

/// A message's routing keys as the trace reports them: its routing key and
/// those of its `CC` header (`BCC` was removed before it was queued).
fn routing_keys_of(message: &Message) -> Vec<FieldValue> {
    let headers = message.header.properties.headers().ok().flatten();
    routing_keys(&message.routing_key, headers.as_ref())
}

/// The routing key and the `CC` and `BCC` keys of a publish.
pub fn routing_keys(routing_key: &ShortStr, headers: Option<&FieldTable>) -> Vec<FieldValue> {
    let mut keys = vec![long(routing_key)];
    for name in ["CC", "BCC"] {
        if let Some(FieldValue::Array(extra)) = headers.and_then(|h| h.get(name)) {
            keys.extend(extra.iter().filter(|k| k.as_str().is_some()).cloned());
        }
    }
    keys
}

/// RabbitMQ's trace headers common to both kinds of copy: `exchange_name`,
/// `routing_keys`, `properties` (the message's properties, integers as
/// signed ints) and `node`.
fn message_table(message: &Message, routing_keys: Vec<FieldValue>, node: &str) -> FieldTable {
    let props = message.header.properties.decode().unwrap_or_default();
    let mut p = FieldTable::new();
    let mut text = |name: &'static str, v: &Option<ShortStr>| {
        if let Some(v) = v {
            p.insert(s(name), long(v));
        }
    };
    text("content_type", &props.content_type);
    text("content_encoding", &props.content_encoding);
    text("correlation_id", &props.correlation_id);
    text("reply_to", &props.reply_to);
    text("expiration", &props.expiration);
    text("message_id", &props.message_id);
    text("type", &props.kind);
    text("user_id", &props.user_id);
    text("app_id", &props.app_id);
    text("cluster_id", &props.cluster_id);
    if let Some(h) = props.headers {
        p.insert(s("headers"), FieldValue::Table(h));
    }
    if let Some(v) = props.delivery_mode {
        p.insert(s("delivery_mode"), FieldValue::I32(i32::from(v)));
    }
    if let Some(v) = props.priority {
        p.insert(s("priority"), FieldValue::I32(i32::from(v)));
    }
    if let Some(v) = props.timestamp {
        p.insert(
            s("timestamp"),
            FieldValue::I32(i32::try_from(v).unwrap_or(i32::MAX)),
        );
    }
    let mut t = FieldTable::new();
    t.insert(s("exchange_name"), long(&message.exchange));
    t.insert(s("routing_keys"), FieldValue::Array(routing_keys));
    t.insert(s("properties"), FieldValue::Table(p));
    t.insert(s("node"), long(node));
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use queue_store::MessageId;

    fn message(exchange: &'static str) -> Message {
        Message {
            id: MessageId(1),
            exchange: s(exchange),
            routing_key: s("rk"),
            header: ContentHeader {
                class_id: amqp_codec::class_id::BASIC,
                weight: 0,
                body_size: 4,
                properties: BasicProperties {
                    delivery_mode: Some(2),
                    content_type: Some(s("text/plain")),
                    ..Default::default()
                }
                .to_raw()
                .unwrap_or_default(),
            },
            body: Bytes::from_static(b"body"),
        }
    }

    const PARTY: Party<'static> = Party {
        connection: "c",
        channel: 1,
        user: "guest",
    };

    #[test]
    fn a_copy_names_the_node_that_made_it() {
        let t = Tracer::new("n2@host");
        t.set(true);
        t.delivered("/", "q", &message("amq.direct"), false, PARTY);
        let copies = t.take();
        let headers = copies[0].header.properties.headers().ok().flatten();
        assert_eq!(
            headers
                .unwrap_or_default()
                .get("node")
                .and_then(FieldValue::as_str),
            Some("n2@host")
        );
    }

    #[test]
    fn copies_only_while_on_and_never_of_copies() {
        let t = Tracer::default();
        assert!(!t.is_on());
        t.set(true);
        t.delivered("/", "q", &message("amq.direct"), true, PARTY);
        t.delivered("/", "q", &message(TRACE_EXCHANGE), false, PARTY);
        let copies = t.take();
        assert_eq!(copies.len(), 1, "a copy of a trace message is not traced");
        let copy = &copies[0];
        assert_eq!(copy.routing_key.as_str(), "deliver.q");
        assert_eq!(&copy.body[..], b"body");
        let headers = copy.header.properties.headers().ok().flatten();
        let headers = headers.unwrap_or_default();
        assert_eq!(
            headers.get("exchange_name").and_then(FieldValue::as_str),
            Some("amq.direct")
        );
        assert_eq!(headers.get("redelivered"), Some(&FieldValue::I32(1)));
        let Some(FieldValue::Table(props)) = headers.get("properties") else {
            panic!("no properties table")
        };
        assert_eq!(props.get("delivery_mode"), Some(&FieldValue::I32(2)));
        assert_eq!(
            props.get("content_type").and_then(FieldValue::as_str),
            Some("text/plain")
        );
        t.set(false);
        assert!(t.take().is_empty());
    }
}
