//! A read buffer of arbitrary octets through splitter, frame decoder and assembler.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    amqp_codec::fuzzing::decode_stream(data, 0);
    amqp_codec::fuzzing::decode_stream(data, 4096);
});
