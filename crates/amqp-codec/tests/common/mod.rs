//! Shared proptest strategies for the codec's integration tests. `methods.rs`
//! beside this file is generated from the spec (see `codegen/generate.py`).
#![allow(dead_code)] // each test binary uses a different subset
#![allow(clippy::expect_used)]

pub(crate) mod methods;

use amqp_codec::{BasicProperties, FieldTable, FieldValue, ShortStr};
use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;

/// Any short string: arbitrary Unicode, at most 255 octets.
pub(crate) fn arb_short_str() -> impl Strategy<Value = ShortStr> {
    ".{0,63}".prop_map(|s: String| ShortStr::try_from(s).expect("63 chars fit in 255 octets"))
}

/// Any long string: arbitrary octets.
pub(crate) fn arb_long_str() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..64).prop_map(Bytes::from)
}

/// Any field value, nested a few levels deep.
pub(crate) fn arb_field_value() -> impl Strategy<Value = FieldValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(FieldValue::Bool),
        any::<i8>().prop_map(FieldValue::I8),
        any::<u8>().prop_map(FieldValue::U8),
        any::<i16>().prop_map(FieldValue::I16),
        any::<u16>().prop_map(FieldValue::U16),
        any::<i32>().prop_map(FieldValue::I32),
        any::<u32>().prop_map(FieldValue::U32),
        any::<i64>().prop_map(FieldValue::I64),
        any::<u32>().prop_map(|b| FieldValue::F32(f32::from_bits(b))),
        any::<u64>().prop_map(|b| FieldValue::F64(f64::from_bits(b))),
        (any::<u8>(), any::<u32>()).prop_map(|(scale, value)| FieldValue::Decimal { scale, value }),
        arb_long_str().prop_map(FieldValue::LongStr),
        any::<u64>().prop_map(FieldValue::Timestamp),
        Just(FieldValue::Void),
        arb_long_str().prop_map(FieldValue::ByteArray),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(FieldValue::Array),
            vec((arb_short_str(), inner), 0..6)
                .prop_map(|entries| FieldValue::Table(entries.into_iter().collect())),
        ]
    })
}

/// Any field table.
pub(crate) fn arb_table() -> impl Strategy<Value = FieldTable> {
    vec((arb_short_str(), arb_field_value()), 0..6).prop_map(|e| e.into_iter().collect())
}

/// Any combination of the 14 basic properties.
pub(crate) fn arb_properties() -> impl Strategy<Value = BasicProperties> {
    let s = || proptest::option::of(arb_short_str());
    (
        (
            s(),
            s(),
            proptest::option::of(arb_table()),
            any::<Option<u8>>(),
            any::<Option<u8>>(),
        ),
        (s(), s(), s(), s(), any::<Option<u64>>()),
        (s(), s(), s(), s()),
    )
        .prop_map(
            |(
                (content_type, content_encoding, headers, delivery_mode, priority),
                (correlation_id, reply_to, expiration, message_id, timestamp),
                (kind, user_id, app_id, cluster_id),
            )| BasicProperties {
                content_type,
                content_encoding,
                headers,
                delivery_mode,
                priority,
                correlation_id,
                reply_to,
                expiration,
                message_id,
                timestamp,
                kind,
                user_id,
                app_id,
                cluster_id,
            },
        )
}
