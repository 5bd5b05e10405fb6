//! Round-trip properties: whatever we encode, we decode to the same value, for
//! every method of the spec, content headers with any properties, and field tables.
// Test code: a panic here is a failed assertion, not something a peer can cause.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use amqp_codec::{
    ContentHeader, FieldTable, Frame, decode_frame, encode_content_header, encode_method,
};
use bytes::BytesMut;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_method_round_trips(method in common::methods::arb_method(), channel in any::<u16>()) {
        let mut buf = BytesMut::new();
        encode_method(&mut buf, channel, &method).unwrap();
        let encoded = buf.clone();
        let frame = decode_frame(&mut buf, 0).unwrap().unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!(&frame, &Frame::Method { channel, method: method.clone() });
        // And re-encoding gives the same octets.
        let mut again = BytesMut::new();
        frame.encode(&mut again).unwrap();
        prop_assert_eq!(again, encoded);
    }

    #[test]
    fn content_headers_round_trip(props in common::arb_properties(), body_size in any::<u64>()) {
        let header = ContentHeader { class_id: 60, weight: 0, body_size, properties: props.to_raw().unwrap() };
        let mut buf = BytesMut::new();
        encode_content_header(&mut buf, 7, &header).unwrap();
        let Frame::Header { channel: 7, header: decoded } = decode_frame(&mut buf, 0).unwrap().unwrap() else {
            panic!("not a header frame");
        };
        prop_assert_eq!(&decoded, &header);
        prop_assert_eq!(decoded.properties.decode().unwrap(), props.clone());
        // The allocation-free accessors agree with the full decode.
        prop_assert_eq!(decoded.properties.delivery_mode(), props.delivery_mode);
        prop_assert_eq!(decoded.properties.priority(), props.priority);
        prop_assert_eq!(decoded.properties.expiration(), props.expiration);
        prop_assert_eq!(decoded.properties.user_id(), props.user_id);
        prop_assert_eq!(decoded.properties.reply_to(), props.reply_to);
        prop_assert_eq!(decoded.properties.headers().unwrap(), props.headers);
    }

    #[test]
    fn field_tables_round_trip(table in common::arb_table()) {
        let mut buf = BytesMut::new();
        table.encode(&mut buf).unwrap();
        let bytes = buf.freeze();
        let (decoded, used) = FieldTable::decode(&bytes).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(decoded, table);
    }
}
