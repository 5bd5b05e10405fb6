//! Routing decisions recorded from a real RabbitMQ 3.10.8 node
//! (`conformance/capture/probe_routing.py`), replayed against the router:
//! every topic (pattern, key) pair and every headers (binding, message) pair
//! must route exactly as RabbitMQ did.
// Test code: a panic here is a failed assertion.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use amqp_codec::{FieldTable, FieldValue, ShortStr};
use exchange::{BindingDef, Destination, ExchangeDeclare, QueueId, Routed, Router};
use serde_json::Value;

fn router(kind: &str) -> Router {
    let mut r = Router::new(ShortStr::from_static("/"));
    r.declare_exchange(
        ExchangeDeclare {
            name: "x",
            kind,
            durable: false,
            auto_delete: false,
            internal: false,
            arguments: &FieldTable::new(),
        },
        false,
    )
    .unwrap();
    r.add_queue(ShortStr::from_static("q"), QueueId(1));
    r
}

fn binding(key: &str, arguments: FieldTable) -> BindingDef {
    BindingDef {
        source: ShortStr::from_static("x"),
        destination: Destination::Queue(ShortStr::from_static("q")),
        routing_key: ShortStr::try_from(key).unwrap(),
        arguments,
    }
}

/// Data rows of a TSV file: comment lines and the header row skipped.
fn rows(text: &str) -> Vec<Vec<&str>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .skip(1)
        .map(|l| l.split('\t').collect())
        .collect()
}

#[test]
fn topic_matches_rabbitmq() {
    let table = rows(include_str!("data/topic_rabbitmq_3_10.tsv"));
    assert!(table.len() >= 40, "{} rows", table.len());
    let mut failures = Vec::new();
    for row in &table {
        let pattern: String = serde_json::from_str(row[0]).unwrap();
        let key: String = serde_json::from_str(row[1]).unwrap();
        let expected: bool = row[2].trim().parse().unwrap();
        // Keys over 255 octets cannot be sent; RabbitMQ's table has none.
        let mut r = router("topic");
        r.bind(&binding(&pattern, FieldTable::new())).unwrap();
        let mut out = Routed::default();
        r.route("x", &key, None, &mut out).unwrap();
        if out.is_unroutable() == expected {
            failures.push(format!(
                "pattern {pattern:?} key {key:?}: RabbitMQ says {expected}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `{"type": letter, "value": ...}` → the AMQP value RabbitMQ received.
fn field_value(v: &Value) -> Option<FieldValue> {
    let ty = v["type"].as_str().unwrap();
    let value = &v["value"];
    Some(match ty {
        "t" => FieldValue::Bool(value.as_bool().unwrap()),
        "b" => FieldValue::I8(value.as_i64().unwrap() as i8),
        "B" => FieldValue::U8(value.as_u64().unwrap() as u8),
        "s" => FieldValue::I16(value.as_i64().unwrap() as i16),
        "u" => FieldValue::U16(value.as_u64().unwrap() as u16),
        "I" => FieldValue::I32(value.as_i64().unwrap() as i32),
        "i" => FieldValue::U32(value.as_u64().unwrap() as u32),
        "l" => FieldValue::I64(value.as_i64().unwrap()),
        "f" => FieldValue::F32(value.as_f64().unwrap() as f32),
        "d" => FieldValue::F64(value.as_f64().unwrap()),
        "D" => FieldValue::Decimal {
            scale: v["scale"].as_u64().unwrap() as u8,
            value: value.as_u64().unwrap() as u32,
        },
        "S" => FieldValue::from(value.as_str().unwrap()),
        "x" => {
            let hex = v["hex"].as_str().unwrap();
            let octets: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            FieldValue::ByteArray(octets.into())
        }
        "T" => FieldValue::Timestamp(value.as_u64().unwrap()),
        "F" => FieldValue::Table(table(value)?),
        "A" => FieldValue::Array(
            value
                .as_array()
                .unwrap()
                .iter()
                .map(field_value)
                .collect::<Option<_>>()?,
        ),
        "V" => FieldValue::Void,
        // 'L' is a RabbitMQ extension outside AMQP 0-9-1's table; our codec
        // rejects it, so the rows that use it cannot arise.
        "L" => return None,
        other => panic!("unknown type {other}"),
    })
}

fn table(v: &Value) -> Option<FieldTable> {
    let mut t = FieldTable::new();
    if let Some(pairs) = v.get("__pairs__") {
        // Repeated keys, kept in order (FieldTable::insert would merge them,
        // so build through the wire format).
        let mut entries = Vec::new();
        for p in pairs.as_array().unwrap() {
            entries.push((p[0].as_str().unwrap().to_owned(), field_value(&p[1])?));
        }
        return Some(raw_table(&entries));
    }
    for (k, val) in v.as_object().unwrap() {
        t.insert(ShortStr::try_from(k.as_str()).unwrap(), field_value(val)?);
    }
    Some(t)
}

fn raw_table(entries: &[(String, FieldValue)]) -> FieldTable {
    let mut body = bytes::BytesMut::new();
    for (k, v) in entries {
        body.extend_from_slice(&[k.len() as u8]);
        body.extend_from_slice(k.as_bytes());
        v.encode(&mut body).unwrap();
    }
    let mut buf = bytes::BytesMut::new();
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    FieldTable::decode(&buf.freeze()).unwrap().0
}

#[test]
fn headers_match_rabbitmq() {
    let table_rows = rows(include_str!("data/headers_rabbitmq_3_10.tsv"));
    assert!(table_rows.len() >= 40, "{} rows", table_rows.len());
    let (mut checked, mut failures) = (0, Vec::new());
    for row in &table_rows {
        let binding_args: Value = serde_json::from_str(row[0]).unwrap();
        let message: Value = serde_json::from_str(row[1]).unwrap();
        let expected: bool = row[2].trim().parse().unwrap();
        let (Some(args), Some(headers)) = (
            table(&binding_args),
            if message.is_null() {
                Some(None)
            } else {
                table(&message).map(Some)
            },
        ) else {
            continue;
        };
        let mut r = router("headers");
        r.bind(&binding("", args)).unwrap();
        let mut out = Routed::default();
        r.route("x", "", headers.as_ref(), &mut out).unwrap();
        checked += 1;
        if out.is_unroutable() == expected {
            failures.push(format!(
                "{}: RabbitMQ says {expected} ({})",
                row[0],
                row.get(3).unwrap_or(&"")
            ));
        }
    }
    assert!(checked >= 80, "only {checked} rows checked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn invalid_x_match_is_refused_as_rabbitmq_does() {
    let mut r = router("headers");
    let args: FieldTable = [(
        ShortStr::from_static("x-match"),
        FieldValue::ByteArray("any".as_bytes().into()),
    )]
    .into_iter()
    .collect();
    let e = r.bind(&binding("", args)).unwrap_err();
    assert_eq!(e.reply_code(), 406);
    assert!(
        e.to_string()
            .starts_with("Invalid x-match field type binary"),
        "{e}"
    );
}
