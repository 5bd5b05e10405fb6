//! Hot-path benchmarks: decoding what a publisher sends (basic.publish +
//! content header + 16-byte body) and encoding what a consumer receives
//! (basic.deliver + content header + body). Results go in the crate README.

// A bench that meets an error should stop loudly.
#![allow(clippy::unwrap_used, missing_docs)]

use amqp_codec::methods::{BasicDeliver, BasicPublish};
use amqp_codec::{
    BasicProperties, CommandAssembler, ContentHeader, Method, ShortStr, class_id, decode_frame,
    encode_body, encode_content_header, encode_method,
};
use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const FRAME_MAX: u32 = 131_072;
const BATCH: usize = 1000;

fn header(body_size: u64) -> ContentHeader {
    ContentHeader {
        class_id: class_id::BASIC,
        weight: 0,
        body_size,
        properties: BasicProperties {
            delivery_mode: Some(2),
            content_type: Some(ShortStr::from_static("application/octet-stream")),
            ..Default::default()
        }
        .to_raw()
        .unwrap(),
    }
}

fn publish_triples(n: usize) -> BytesMut {
    let publish = Method::from(BasicPublish {
        exchange: ShortStr::from_static("amq.direct"),
        routing_key: ShortStr::from_static("orders.created"),
        ..Default::default()
    });
    let body = [0x5au8; 16];
    let mut buf = BytesMut::new();
    for _ in 0..n {
        encode_method(&mut buf, 1, &publish).unwrap();
        encode_content_header(&mut buf, 1, &header(16)).unwrap();
        encode_body(&mut buf, 1, &body, FRAME_MAX).unwrap();
    }
    buf
}

fn decode_publish(c: &mut Criterion) {
    let input = publish_triples(BATCH).freeze();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("publish+header+16B body (per 1000)", |b| {
        let mut assembler = CommandAssembler::new(128 << 20);
        b.iter(|| {
            // A fresh read buffer holding BATCH triples, as if read from a socket.
            let mut buf = BytesMut::from(&input[..]);
            let mut commands = 0;
            while let Some(frame) = decode_frame(&mut buf, FRAME_MAX).unwrap() {
                if let Some(cmd) = assembler.push(frame).unwrap() {
                    black_box(&cmd);
                    commands += 1;
                }
            }
            assert_eq!(commands, BATCH);
        })
    });
    g.finish();
}

fn encode_deliver(c: &mut Criterion) {
    let header = header(16);
    let body = [0x5au8; 16];
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("deliver+header+16B body (per 1000)", |b| {
        let mut buf = BytesMut::with_capacity(BATCH * 128);
        let consumer_tag = ShortStr::from_static("amq.ctag-1234567890abcdef");
        let exchange = ShortStr::from_static("amq.direct");
        let routing_key = ShortStr::from_static("orders.created");
        b.iter(|| {
            buf.clear();
            for tag in 0..BATCH as u64 {
                let deliver = Method::BasicDeliver(BasicDeliver {
                    consumer_tag: consumer_tag.clone(),
                    delivery_tag: tag + 1,
                    redelivered: false,
                    exchange: exchange.clone(),
                    routing_key: routing_key.clone(),
                });
                encode_method(&mut buf, 1, &deliver).unwrap();
                encode_content_header(&mut buf, 1, &header).unwrap();
                encode_body(&mut buf, 1, &body, FRAME_MAX).unwrap();
            }
            black_box(buf.len());
        })
    });
    g.finish();
}

criterion_group!(benches, decode_publish, encode_deliver);
criterion_main!(benches);
