//! Golden tests: frames captured between pika 1.4.4 and RabbitMQ 3.10.8
//! (`tests/golden/pika_rabbitmq_3_10.txt`, made by
//! `conformance/capture/capture_golden.py`) decode to the expected values and
//! re-encode to exactly the same octets, and each direction's frames assemble
//! into complete commands.
// Test code: a panic here is a failed assertion, not something a peer can cause.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::HashMap;

use amqp_codec::methods::{BasicReturn, ConnectionStart, ConnectionTune};
use amqp_codec::{
    CommandAssembler, FieldValue, Frame, Method, ProtocolHeaderCheck, check_protocol_header,
    decode_frame,
};
use bytes::{Bytes, BytesMut};

const FRAME_MAX: u32 = 131_072;

struct Line {
    client: bool,
    /// The frame's octets; `None` for the protocol header.
    frame: Option<Bytes>,
    /// For frames the capture omitted: (channel, body size).
    omitted_body: Option<(u16, usize)>,
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn capture() -> Vec<Line> {
    let text = include_str!("golden/pika_rabbitmq_3_10.txt");
    let mut lines = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# omitted: ") {
            // "# omitted: C 3 2 body frame, payload 131064 bytes, sha256 …"
            let f: Vec<&str> = rest.split_whitespace().collect();
            let size = f[f.iter().position(|w| *w == "payload").unwrap() + 1];
            lines.push(Line {
                client: f[0] == "C",
                frame: None,
                omitted_body: Some((f[2].parse().unwrap(), size.parse().unwrap())),
            });
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let octets = unhex(f[3]);
        if f[1] == "proto" {
            assert_eq!(check_protocol_header(&octets), ProtocolHeaderCheck::Valid);
            lines.push(Line {
                client: true,
                frame: None,
                omitted_body: None,
            });
            continue;
        }
        lines.push(Line {
            client: f[0] == "C",
            frame: Some(Bytes::from(octets)),
            omitted_body: None,
        });
    }
    lines
}

fn decode_one(octets: &Bytes) -> Frame {
    let mut buf = BytesMut::from(&octets[..]);
    let frame = decode_frame(&mut buf, FRAME_MAX).unwrap().unwrap();
    assert!(buf.is_empty(), "one frame per line");
    frame
}

fn methods(client: bool) -> Vec<Method> {
    capture()
        .into_iter()
        .filter(|l| l.client == client)
        .filter_map(|l| l.frame)
        .filter_map(|f| match decode_one(&f) {
            Frame::Method { method, .. } => Some(method),
            _ => None,
        })
        .collect()
}

#[test]
fn every_captured_frame_reencodes_to_the_same_octets() {
    let mut n = 0;
    for octets in capture().into_iter().filter_map(|l| l.frame) {
        let frame = decode_one(&octets);
        let mut again = BytesMut::new();
        frame.encode(&mut again).unwrap();
        assert_eq!(&again[..], &octets[..], "{frame:?}");
        n += 1;
    }
    assert!(n > 100, "only {n} frames in the capture");
}

#[test]
fn each_direction_assembles_into_complete_commands() {
    for client in [true, false] {
        let mut assemblers: HashMap<u16, CommandAssembler> = HashMap::new();
        let (mut with_content, mut content_methods) = (0, 0);
        for line in capture().into_iter().filter(|l| l.client == client) {
            let frame = match (line.frame, line.omitted_body) {
                (Some(octets), _) => decode_one(&octets),
                // The capture kept only a digest of some large body frames; their
                // size is what the assembler checks.
                (None, Some((channel, size))) => Frame::Body {
                    channel,
                    body: Bytes::from(vec![0; size]),
                },
                (None, None) => continue,
            };
            if let Frame::Heartbeat = frame {
                continue;
            }
            if let Frame::Method { method, .. } = &frame {
                content_methods += usize::from(method.has_content());
            }
            let assembler = assemblers
                .entry(frame.channel())
                .or_insert_with(|| CommandAssembler::new(1 << 30));
            if let Some(cmd) = assembler.push(frame).unwrap() {
                with_content += usize::from(cmd.content.is_some());
            }
        }
        assert!(content_methods > 5);
        assert_eq!(
            with_content, content_methods,
            "client={client}: every content method completed"
        );
        assert!(assemblers.values().all(CommandAssembler::is_idle));
    }
}

#[test]
fn rabbitmq_connection_start_and_tune() {
    let server = methods(false);
    let Some(Method::ConnectionStart(ConnectionStart {
        version_major,
        version_minor,
        server_properties,
        mechanisms,
        locales,
    })) = server.first()
    else {
        panic!("first server method is not connection.start");
    };
    assert_eq!((*version_major, *version_minor), (0, 9));
    assert_eq!(
        server_properties
            .get("product")
            .and_then(FieldValue::as_str),
        Some("RabbitMQ")
    );
    assert_eq!(
        server_properties
            .get("version")
            .and_then(FieldValue::as_str),
        Some("3.10.8")
    );
    let Some(FieldValue::Table(caps)) = server_properties.get("capabilities") else {
        panic!("no capabilities")
    };
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        assert_eq!(caps.get(cap), Some(&FieldValue::Bool(true)), "{cap}");
    }
    assert!(
        std::str::from_utf8(mechanisms)
            .unwrap()
            .split(' ')
            .any(|m| m == "PLAIN")
    );
    assert_eq!(&locales[..], b"en_US");
    assert!(server.contains(&Method::ConnectionTune(ConnectionTune {
        channel_max: 2047,
        frame_max: 131_072,
        heartbeat: 60
    })));
}

#[test]
fn pika_publish_with_all_properties() {
    let header = capture()
        .into_iter()
        .filter(|l| l.client)
        .filter_map(|l| l.frame)
        .find_map(|f| match decode_one(&f) {
            Frame::Header { header, .. } if header.properties.flags() == 0xfffc => Some(header),
            _ => None,
        })
        .expect("a header frame with all 14 properties");
    let p = header.properties.decode().unwrap();
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert_eq!(p.content_encoding.as_deref(), Some("utf-8"));
    assert_eq!((p.delivery_mode, p.priority), (Some(2), Some(5)));
    assert_eq!(p.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(p.reply_to.as_deref(), Some("warren.reply"));
    assert_eq!(p.expiration.as_deref(), Some("60000"));
    assert_eq!(p.message_id.as_deref(), Some("msg-0001"));
    assert_eq!(p.kind.as_deref(), Some("warren.test"));
    assert_eq!(p.user_id.as_deref(), Some("guest"));
    assert_eq!(p.app_id.as_deref(), Some("warren-capture"));
    assert_eq!(p.cluster_id.as_deref(), Some("warren-cluster"));
    let h = p.headers.unwrap();
    let get = |k: &str| h.get(k).unwrap_or_else(|| panic!("header {k}")).clone();
    assert_eq!(get("str").as_str(), Some("hello"));
    assert_eq!(get("unicode").as_str(), Some("h\u{e9}llo \u{2603}"));
    assert_eq!(get("int"), FieldValue::I32(42));
    assert_eq!(get("neg"), FieldValue::I32(-7));
    assert_eq!(get("big"), FieldValue::I64(1 << 40));
    assert_eq!(get("float"), FieldValue::F64(3.25));
    assert_eq!(get("bool"), FieldValue::Bool(true));
    assert_eq!(get("false"), FieldValue::Bool(false));
    assert_eq!(get("void"), FieldValue::Void);
    assert_eq!(
        get("dec"),
        FieldValue::Decimal {
            scale: 2,
            value: 314
        }
    );
    assert_eq!(get("ts"), FieldValue::Timestamp(1_700_000_000));
    assert_eq!(
        get("bytes"),
        FieldValue::ByteArray(Bytes::from_static(b"\x00\x01\xfe\xff"))
    );
    assert_eq!(get("i8"), FieldValue::I8(-5));
    assert_eq!(get("u8"), FieldValue::U8(200));
    assert_eq!(get("i16"), FieldValue::I16(-300));
    assert_eq!(get("u16"), FieldValue::U16(60000));
    assert_eq!(get("u32"), FieldValue::U32(4_000_000_000));
    assert_eq!(get("f32"), FieldValue::F32(1.5));
    let FieldValue::Array(list) = get("list") else {
        panic!("list")
    };
    assert_eq!(list.len(), 5);
    assert_eq!(list[3], FieldValue::Void);
    let FieldValue::Table(nested) = get("nested") else {
        panic!("nested")
    };
    let Some(FieldValue::Table(deeper)) = nested.get("deeper") else {
        panic!("deeper")
    };
    assert_eq!(
        deeper.get("c"),
        Some(&FieldValue::Array(vec![
            FieldValue::I32(1),
            FieldValue::I32(2)
        ]))
    );
    assert_eq!(get("empty_table"), FieldValue::Table(Default::default()));
}

#[test]
fn rabbitmq_basic_return_for_unroutable_mandatory_publish() {
    let ret = methods(false)
        .into_iter()
        .find_map(|m| match m {
            Method::BasicReturn(r) => Some(r),
            _ => None,
        })
        .unwrap();
    let BasicReturn {
        reply_code,
        reply_text,
        exchange,
        routing_key,
    } = ret;
    assert_eq!(reply_code, amqp_codec::reply_code::NO_ROUTE);
    assert_eq!(reply_text, "NO_ROUTE");
    assert_eq!(exchange, "warren.direct2");
    assert_eq!(routing_key, "nowhere");
}
