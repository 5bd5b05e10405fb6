//! Dead-lettering: turning a message that leaves a queue (rejected, expired,
//! over the length limit, over the delivery limit) into the message its
//! dead-letter exchange receives, with RabbitMQ's `x-death` header.
//!
//! `x-death` is an array of tables, most recent first, one per
//! `{queue, reason}` pair: `count` (long), `reason`, `queue`, `time`
//! (timestamp), `exchange`, `routing-keys` (array), and `original-expiration`
//! when the message carried a per-message TTL. A repeat of the same pair
//! increments its count and moves it to the front. `x-first-death-*` are set
//! once; `x-last-death-*` every time (RabbitMQ 3.13 added these; 3.10 sends
//! only the first-death ones). The `expiration` property is removed so the
//! dead-lettered copy does not expire again, and with a dead-letter routing key
//! the `CC` header goes too. All of this was checked against RabbitMQ 3.10.8
//! (`tests/data/rabbitmq_3_10_dead_letter.md`).

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

    let had_deaths = headers.get("x-death").is_some();
    let mut deaths = match headers.remove("x-death") {
        Some(FieldValue::Array(d)) => group_by_queue_and_reason(d),
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
                // (A missing count counts as none yet, as in RabbitMQ.)
                let count = t.get("count").and_then(FieldValue::as_i64).unwrap_or(0);
                t.insert(s("count"), FieldValue::I64(count.saturating_add(1)));
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
    // RabbitMQ 3.10 sets x-first-death-* only when the message had no
    // x-death yet (and never overwrites them).
    if !had_deaths && headers.get("x-first-death-reason").is_none() {
        headers.insert(s("x-first-death-reason"), FieldValue::from(reason.as_str()));
        headers.insert(s("x-first-death-queue"), long_str(queue));
        headers.insert(s("x-first-death-exchange"), long_str(&msg.exchange));
    }
    headers.insert(s("x-last-death-reason"), FieldValue::from(reason.as_str()));
    headers.insert(s("x-last-death-queue"), long_str(queue));
    headers.insert(s("x-last-death-exchange"), long_str(&msg.exchange));
    if dl_routing_key.is_some() {
        // Routed by the dead-letter routing key alone: RabbitMQ drops `CC`.
        headers.remove("CC");
    }
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

/// Merges `x-death` entries for the same `{queue, reason}` into one: the
/// first (most recent) keeps its place and fields, and its `count`; if it
/// has none, the count is the number of entries merged (RabbitMQ's rule for
/// headers written before it kept one entry per pair, rabbitmq-server#78).
/// Without this an old-style header would grow by an entry on every trip
/// through a dead-letter cycle. A lone entry is left as it is (as RabbitMQ
/// does); entries that are not tables are kept.
fn group_by_queue_and_reason(deaths: Vec<FieldValue>) -> Vec<FieldValue> {
    if deaths.len() < 2 {
        return deaths;
    }
    /// An entry's `{queue, reason}` (none for an entry that is not a table).
    type Key = Option<(Option<String>, Option<String>)>;
    let key = |d: &FieldValue| -> Key {
        match d {
            FieldValue::Table(t) => Some((
                str_of(t.get("queue")).map(str::to_owned),
                str_of(t.get("reason")).map(str::to_owned),
            )),
            _ => None,
        }
    };
    // Each kept entry, its key, and how many entries it stands for.
    let mut grouped: Vec<(FieldValue, Key, i64)> = Vec::with_capacity(deaths.len());
    for d in deaths {
        let k = key(&d);
        match grouped
            .iter_mut()
            .find(|(_, seen, _)| k.is_some() && *seen == k)
        {
            Some((_, _, n)) => *n = n.saturating_add(1),
            None => grouped.push((d, k, 1)),
        }
    }
    grouped
        .into_iter()
        .map(|(d, _, n)| match d {
            FieldValue::Table(mut t) if t.get("count").is_none() => {
                t.insert(s("count"), FieldValue::I64(n));
                FieldValue::Table(t)
            }
            other => other,
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageId;
    use amqp_codec::class_id;

    fn published(headers: FieldTable, expiration: Option<&'static str>) -> Message {
        Message {
            id: MessageId(1),
            exchange: ShortStr::from_static("src"),
            routing_key: ShortStr::from_static("rk"),
            header: ContentHeader {
                class_id: class_id::BASIC,
                weight: 0,
                body_size: 4,
                properties: BasicProperties {
                    headers: Some(headers),
                    expiration: expiration.map(ShortStr::from_static),
                    ..Default::default()
                }
                .to_raw()
                .unwrap(),
            },
            body: Bytes::from_static(b"body"),
        }
    }

    fn cc() -> FieldTable {
        [(s("CC"), FieldValue::Array(vec![FieldValue::from("cc1")]))]
            .into_iter()
            .collect()
    }

    fn headers_of(d: &DeadLetter) -> FieldTable {
        d.header.properties.decode().unwrap().headers.unwrap()
    }

    fn deaths(h: &FieldTable) -> Vec<FieldTable> {
        match h.get("x-death") {
            Some(FieldValue::Array(a)) => a
                .iter()
                .map(|v| match v {
                    FieldValue::Table(t) => t.clone(),
                    other => panic!("{other:?}"),
                })
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn first_death_has_rabbitmq_fields_and_types() {
        let m = published(cc(), Some("60000"));
        let d = dead_letter(
            &m,
            &s("q1"),
            DeadLetterReason::Rejected,
            &s("dlx"),
            None,
            1_700_000_000,
        );
        assert_eq!(d.exchange, "dlx");
        assert_eq!(d.routing_keys, [s("rk"), s("cc1")]);
        let h = headers_of(&d);
        let x = deaths(&h);
        assert_eq!(x.len(), 1);
        let keys: Vec<&str> = x[0].iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "count",
                "reason",
                "queue",
                "time",
                "exchange",
                "routing-keys",
                "original-expiration"
            ]
        );
        assert_eq!(x[0].get("count"), Some(&FieldValue::I64(1)));
        assert_eq!(
            x[0].get("reason").and_then(FieldValue::as_str),
            Some("rejected")
        );
        assert_eq!(
            x[0].get("time"),
            Some(&FieldValue::Timestamp(1_700_000_000))
        );
        assert_eq!(
            x[0].get("exchange").and_then(FieldValue::as_str),
            Some("src")
        );
        assert_eq!(
            x[0].get("routing-keys"),
            Some(&FieldValue::Array(vec![
                FieldValue::from("rk"),
                FieldValue::from("cc1")
            ]))
        );
        assert_eq!(
            x[0].get("original-expiration").and_then(FieldValue::as_str),
            Some("60000")
        );
        assert_eq!(
            h.get("x-first-death-reason").and_then(FieldValue::as_str),
            Some("rejected")
        );
        assert_eq!(
            h.get("x-first-death-queue").and_then(FieldValue::as_str),
            Some("q1")
        );
        assert_eq!(
            h.get("x-first-death-exchange").and_then(FieldValue::as_str),
            Some("src")
        );
        assert!(h.get("CC").is_some());
        assert_eq!(d.header.properties.expiration(), None, "expiration removed");
        assert_eq!(d.body, m.body);
    }

    #[test]
    fn repeats_count_up_and_move_to_the_front_keeping_time() {
        let m = published(FieldTable::new(), None);
        let first = dead_letter(
            &m,
            &s("q1"),
            DeadLetterReason::Expired,
            &s("dlx"),
            None,
            100,
        );
        let mut again = m.clone();
        again.header = first.header.clone();
        let second = dead_letter(
            &again,
            &s("q2"),
            DeadLetterReason::Rejected,
            &s("dlx"),
            None,
            200,
        );
        let mut third_in = m.clone();
        third_in.header = second.header.clone();
        let third = dead_letter(
            &third_in,
            &s("q1"),
            DeadLetterReason::Expired,
            &s("dlx"),
            None,
            300,
        );
        let h = headers_of(&third);
        let x = deaths(&h);
        assert_eq!(x.len(), 2);
        assert_eq!(x[0].get("queue").and_then(FieldValue::as_str), Some("q1"));
        assert_eq!(x[0].get("count"), Some(&FieldValue::I64(2)));
        assert_eq!(
            x[0].get("time"),
            Some(&FieldValue::Timestamp(100)),
            "time of the first death kept"
        );
        assert_eq!(x[1].get("queue").and_then(FieldValue::as_str), Some("q2"));
        assert_eq!(
            h.get("x-first-death-queue").and_then(FieldValue::as_str),
            Some("q1")
        );
        assert_eq!(
            h.get("x-last-death-queue").and_then(FieldValue::as_str),
            Some("q1")
        );
        assert_eq!(
            h.get("x-last-death-reason").and_then(FieldValue::as_str),
            Some("expired")
        );
    }

    /// Old-style `x-death` (one entry per death, no `count`) is merged into
    /// one entry per `{queue, reason}`, so a dead-letter cycle does not grow
    /// the header without bound.
    #[test]
    fn old_style_entries_are_merged_not_appended() {
        let old = |queue: &'static str, reason: &'static str| {
            let t: FieldTable = [
                (s("queue"), FieldValue::from(queue)),
                (s("reason"), FieldValue::from(reason)),
                (s("exchange"), FieldValue::from("")),
                (s("time"), FieldValue::Timestamp(50)),
            ]
            .into_iter()
            .collect();
            FieldValue::Table(t)
        };
        let headers: FieldTable = [(
            s("x-death"),
            FieldValue::Array(vec![
                old("q1", "rejected"),
                old("q2", "expired"),
                old("q1", "rejected"),
            ]),
        )]
        .into_iter()
        .collect();
        // A lone old-style entry: its missing count counts as none yet.
        let lone: FieldTable = [(s("x-death"), FieldValue::Array(vec![old("q1", "rejected")]))]
            .into_iter()
            .collect();
        let d = dead_letter(
            &published(lone, None),
            &s("q1"),
            DeadLetterReason::Rejected,
            &s("dlx"),
            None,
            100,
        );
        let h = headers_of(&d);
        assert_eq!(deaths(&h)[0].get("count"), Some(&FieldValue::I64(1)));
        assert!(
            h.get("x-first-death-queue").is_none(),
            "x-first-death-* only for a first death (RabbitMQ 3.10)"
        );

        let mut m = published(headers, None);
        for trip in 1..=3_i64 {
            let d = dead_letter(
                &m,
                &s("q1"),
                DeadLetterReason::Rejected,
                &s("dlx"),
                None,
                100,
            );
            let x = deaths(&headers_of(&d));
            assert_eq!(x.len(), 2, "one entry per queue and reason");
            assert_eq!(x[0].get("queue").and_then(FieldValue::as_str), Some("q1"));
            assert_eq!(x[0].get("count"), Some(&FieldValue::I64(2 + trip)));
            assert_eq!(x[1].get("queue").and_then(FieldValue::as_str), Some("q2"));
            assert_eq!(x[1].get("count"), Some(&FieldValue::I64(1)));
            m.header = d.header;
        }
    }

    #[test]
    fn dead_letter_routing_key_replaces_keys_and_drops_cc() {
        let m = published(cc(), None);
        let d = dead_letter(
            &m,
            &s("q"),
            DeadLetterReason::Expired,
            &s("dlx2"),
            Some(&s("newrk")),
            0,
        );
        assert_eq!(d.routing_keys, [s("newrk")]);
        let h = headers_of(&d);
        assert!(h.get("CC").is_none());
        assert_eq!(
            deaths(&h)[0].get("routing-keys"),
            Some(&FieldValue::Array(vec![
                FieldValue::from("rk"),
                FieldValue::from("cc1")
            ]))
        );
    }

    #[test]
    fn cycles_without_a_rejection_are_detected() {
        let m = published(FieldTable::new(), None);
        let expired = dead_letter(&m, &s("qa"), DeadLetterReason::Expired, &s("dlx"), None, 0);
        let h = headers_of(&expired);
        assert!(
            is_cycle(Some(&h), "qa"),
            "expired out of qa, back into qa: dropped"
        );
        assert!(!is_cycle(Some(&h), "qb"));
        let rejected = dead_letter(&m, &s("qa"), DeadLetterReason::Rejected, &s("dlx"), None, 0);
        assert!(
            !is_cycle(Some(&headers_of(&rejected)), "qa"),
            "a rejection breaks the cycle"
        );
        assert!(!is_cycle(None, "qa"));
    }
}
