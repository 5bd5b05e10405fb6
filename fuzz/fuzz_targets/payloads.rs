//! Arbitrary octets as a method payload, a content header payload and a field table.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    amqp_codec::fuzzing::decode_payloads(data);
});
