//! Dead-lettering: turning a message that leaves a queue (rejected, expired,
//! over the length limit, over the delivery limit) into the message its
//! dead-letter exchange receives, with RabbitMQ's `x-death` header.
//!
//! `x-death` is an array of tables, most recent first, one per
//! `{queue, reason}` pair: `count` (long), `reason`, `queue`, `time`
//! (timestamp), `exchange`, `routing-keys` (array), and `original-expiration`
//! when the message carried a per-message TTL. A repeat of the same pair
//! increments its count and moves it to the front. `x-first-death-*` are set
//! once, `x-last-death-*` every time. The `expiration` property is removed so
//! the dead-lettered copy does not expire again.

use amqp_codec::{BasicProperties, ContentHeader, FieldTable, FieldValue, ShortStr};
use bytes::Bytes;

use crate::message::Message;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// `basic.reject` / `basic.nack` with requeue=false.
    Rejected,
    /// Its TTL ran out.
    Expired,
    /// Dropped by `x-max-length` / `x-max-length-bytes`.
    MaxLen,
    /// Returned more often than `x-delivery-limit` allows.
    DeliveryLimit,
}

impl DeadLetterReason {
    /// The `reason` string in `x-death`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::Expired => "expired",
            DeadLetterReason::MaxLen => "maxlen",
            DeadLetterReason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// A message on its way to a dead-letter exchange: the server routes it
/// through `exchange` with each of `routing_keys` and publishes it as a new
/// message (it gets a new id).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The dead-letter exchange.
    pub exchange: ShortStr,
    /// Routing keys to route with.
    pub routing_keys: Vec<ShortStr>,
    /// New content header (`x-death` added, `expiration` removed).
    pub header: ContentHeader,
    /// The body, shared with the original.
    pub body: Bytes,
}

fn s(v: &'static str) -> ShortStr {
    ShortStr::from_static(v)
}

fn long_str(v: &ShortStr) -> FieldValue {
    FieldValue::LongStr(v.clone().into_bytes())
}

fn str_of(v: Option<&FieldValue>) -> Option<&str> {
    v.and_then(FieldValue::as_str)
}

/// The routing keys a message was published with: its key and its `CC` keys.
fn original_routing_keys(msg: &Message, headers: &FieldTable) -> Vec<FieldValue> {
    let mut keys = vec![long_str(&msg.routing_key)];
    if let Some(FieldValue::Array(cc)) = headers.get("CC") {
        keys.extend(cc.iter().filter(|v| v.as_str().is_some()).cloned());
    }
    keys
}

/// Builds the dead-lettered copy of `msg` leaving queue `queue` for `reason`.
///
/// `dlx` and `dl_routing_key` are the queue's `x-dead-letter-exchange` and
/// `x-dead-letter-routing-key`; `now_secs` is the time for `x-death`.
pub fn dead_letter(
    msg: &Message,
    queue: &ShortStr,
    reason: DeadLetterReason,
    dlx: &ShortStr,
    dl_routing_key: Option<&ShortStr>,
    now_secs: u64,
) -> DeadLetter {
    // Properties were validated structurally when the header arrived; if a
    // nested table still fails to decode, the copy goes out with only the
    // dead-letter headers rather than not at all.
    let mut props = msg.header.properties.decode().unwrap_or_default();
    let mut headers = props.headers.take().unwrap_or_default();
    let routing_keys = original_routing_keys(msg, &headers);

    let mut deaths = match headers.remove("x-death") {
        Some(FieldValue::Array(d)) => d,
        _ => Vec::new(),
    };
    let same = |d: &FieldValue| match d {
        FieldValue::Table(t) => {
            str_of(t.get("queue")) == Some(queue.as_str())
                && str_of(t.get("reason")) == Some(reason.as_str())
        }
        _ => false,
    };
    let entry = match deaths.iter().position(same) {
        Some(pos) => {
            let mut old = deaths.remove(pos);
            if let FieldValue::Table(t) = &mut old {
                let count = t.get("count").and_then(FieldValue::as_i64).unwrap_or(0);
                t.insert(s("count"), FieldValue::I64(count + 1));
            }
            old
        }
        None => {
            let mut t = FieldTable::new();
            t.insert(s("count"), FieldValue::I64(1));
            t.insert(s("reason"), FieldValue::from(reason.as_str()));
            t.insert(s("queue"), long_str(queue));
            t.insert(s("time"), FieldValue::Timestamp(now_secs));
            t.insert(s("exchange"), long_str(&msg.exchange));
            t.insert(s("routing-keys"), FieldValue::Array(routing_keys.clone()));
            if let Some(exp) = &props.expiration {
                t.insert(s("original-expiration"), long_str(exp));
            }
            FieldValue::Table(t)
        }
    };
    deaths.insert(0, entry);
    headers.insert(s("x-death"), FieldValue::Array(deaths));
    if headers.get("x-first-death-reason").is_none() {
        headers.insert(s("x-first-death-reason"), FieldValue::from(reason.as_str()));
        headers.insert(s("x-first-death-queue"), long_str(queue));
        headers.insert(s("x-first-death-exchange"), long_str(&msg.exchange));
    }
    headers.insert(s("x-last-death-reason"), FieldValue::from(reason.as_str()));
    headers.insert(s("x-last-death-queue"), long_str(queue));
    headers.insert(s("x-last-death-exchange"), long_str(&msg.exchange));
    props.headers = Some(headers);
    props.expiration = None;

    let routing_keys = match dl_routing_key {
        Some(k) => vec![k.clone()],
        None => routing_keys
            .iter()
            .filter_map(|k| k.as_str().and_then(|k| ShortStr::try_from(k).ok()))
            .collect(),
    };
    let properties = props
        .to_raw()
        .unwrap_or_else(|_| BasicProperties::default().to_raw().unwrap_or_default());
    DeadLetter {
        exchange: dlx.clone(),
        routing_keys,
        header: ContentHeader {
            class_id: msg.header.class_id,
            weight: 0,
            body_size: msg.body.len() as u64,
            properties,
        },
        body: msg.body.clone(),
    }
}

/// Whether dead-lettering a message with these headers into `queue` would
/// close a cycle that no rejection broke: such copies are dropped (RabbitMQ).
pub fn is_cycle(headers: Option<&FieldTable>, queue: &str) -> bool {
    let Some(FieldValue::Array(deaths)) = headers.and_then(|h| h.get("x-death")) else {
        return false;
    };
    for d in deaths {
        let FieldValue::Table(t) = d else { continue };
        if str_of(t.get("reason")) == Some(DeadLetterReason::Rejected.as_str()) {
            return false;
        }
        if str_of(t.get("queue")) == Some(queue) {
            return true;
        }
    }
    false
}
