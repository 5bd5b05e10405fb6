//! Decoding a stream of publishes allocates nothing per frame beyond the
//! `Bytes` split: counted with a global allocator wrapper.
// Test code: a panic here is a failed assertion, not something a peer can cause.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
#![allow(unsafe_code)] // a GlobalAlloc impl is unsafe by definition

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use amqp_codec::methods::BasicPublish;
use amqp_codec::{
    BasicProperties, CommandAssembler, ContentHeader, Method, ShortStr, class_id, decode_frame,
    encode_body, encode_content_header, encode_method,
};
use bytes::BytesMut;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decoding_publishes_does_not_allocate_per_frame() {
    const N: usize = 10_000;
    let publish = Method::from(BasicPublish {
        exchange: ShortStr::from_static("amq.topic"),
        routing_key: ShortStr::from_static("stock.nyse.ibm"),
        ..Default::default()
    });
    let header = ContentHeader {
        class_id: class_id::BASIC,
        weight: 0,
        body_size: 16,
        properties: BasicProperties {
            delivery_mode: Some(2),
            expiration: Some(ShortStr::from_static("60000")),
            ..Default::default()
        }
        .to_raw()
        .unwrap(),
    };
    let mut buf = BytesMut::new();
    for _ in 0..N {
        encode_method(&mut buf, 1, &publish).unwrap();
        encode_content_header(&mut buf, 1, &header).unwrap();
        encode_body(&mut buf, 1, &[7u8; 16], 131_072).unwrap();
    }
    let mut assembler = CommandAssembler::new(128 << 20);
    let mut commands = 0usize;
    let mut persistent = 0usize;

    let before = ALLOCATIONS.load(Ordering::Relaxed);
    while let Some(frame) = decode_frame(&mut buf, 131_072).unwrap() {
        if let Some(cmd) = assembler.push(frame).unwrap() {
            let content = cmd.content.as_ref().unwrap();
            if content.header.properties.delivery_mode() == Some(2)
                && content.header.properties.expiration().is_some()
            {
                persistent += 1;
            }
            commands += 1;
        }
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;

    assert_eq!(commands, N);
    assert_eq!(persistent, N);
    // The first split turns the BytesMut into a shared buffer (one allocation);
    // after that, frames, methods, headers and bodies are all views of it.
    assert!(
        allocations <= 2,
        "{allocations} allocations for {N} publishes (3 frames each)"
    );
}
