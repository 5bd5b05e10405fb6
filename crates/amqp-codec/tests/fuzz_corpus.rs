//! Replays the committed cargo-fuzz corpus (`fuzz/corpus/`) on stable Rust, so
//! every input a fuzzing run kept stays a regression test.
// Test code: a panic here is a failed assertion, not something a peer can cause.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::Path;

use amqp_codec::fuzzing::{decode_payloads, decode_stream};

fn replay(target: &str, run: impl Fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        run(&std::fs::read(&path).unwrap());
        n += 1;
    }
    n
}

#[test]
fn frames_corpus_replays() {
    let n = replay("frames", |data| {
        decode_stream(data, 0);
        decode_stream(data, 4096);
    });
    assert!(n > 0, "the frames corpus is empty");
}

#[test]
fn payloads_corpus_replays() {
    let n = replay("payloads", decode_payloads);
    assert!(n > 0, "the payloads corpus is empty");
}
