//! Arbitrary bytes never panic the decoder: not the frame splitter, not the
//! method, content-header or field-table decoders, not the command assembler.
//! Besides pure noise, valid frame streams with random octets overwritten reach
//! deeper into the decoders than noise does.
// Test code: a panic here is a failed assertion, not something a peer can cause.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use amqp_codec::fuzzing::{decode_payloads, decode_stream};
use amqp_codec::{ContentHeader, encode_body, encode_content_header, encode_method};
use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;

fn valid_stream() -> impl Strategy<Value = Vec<u8>> {
    (
        vec(common::methods::arb_method(), 1..4),
        common::arb_properties(),
        vec(any::<u8>(), 0..300),
    )
        .prop_map(|(methods, props, body)| {
            let mut buf = BytesMut::new();
            for m in &methods {
                encode_method(&mut buf, 1, m).unwrap();
                if m.has_content() {
                    let header = ContentHeader {
                        class_id: m.class_id(),
                        weight: 0,
                        body_size: body.len() as u64,
                        properties: props.to_raw().unwrap(),
                    };
                    encode_content_header(&mut buf, 1, &header).unwrap();
                    encode_body(&mut buf, 1, &body, 4096).unwrap();
                }
            }
            buf.to_vec()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn noise_never_panics(input in vec(any::<u8>(), 0..512), frame_max in prop_oneof![Just(0u32), Just(4096), any::<u32>()]) {
        decode_stream(&input, frame_max);
        decode_payloads(&input);
    }

    #[test]
    fn mutated_valid_streams_never_panic(
        stream in valid_stream(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut input = stream;
        for (at, value) in flips {
            let i = at.index(input.len());
            input[i] = value;
        }
        decode_stream(&input, 0);
        decode_stream(&input, 4096);
        // The payload decoders directly, past the first 7-octet frame header.
        decode_payloads(input.get(7..).unwrap_or_default());
    }
}
