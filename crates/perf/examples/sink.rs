//! A trivial AMQP sink, to measure `warren-perf`'s own ceiling (issue #9):
//! it answers the handshake and the setup methods the tool sends
//! (`channel.open`, `queue.declare`, `queue.purge`, `exchange.declare`,
//! `queue.bind`, `basic.qos`, `confirm.select`) and then discards every
//! publish without routing, storing or confirming anything. Whatever rate the
//! tool reaches against it is the most it can drive; a broker measured with
//! the tool cannot show more.
//!
//! ```sh
//! cargo run --release -p warren-perf --example sink -- 5699 &
//! target/release/warren-perf --uri amqp://guest:guest@127.0.0.1:5699/%2f \
//!     --producers 1 --consumers 0 --size 16 --duration 10
//! ```

// A measurement helper that meets an error should stop loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use amqp_codec::methods::*;
use amqp_codec::{FieldTable, Frame, Method, decode_frame, encode_method};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .map_or(5699, |p| p.parse().expect("a port"));
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    eprintln!("sink listening on 127.0.0.1:{port}");
    loop {
        let (socket, _) = listener.accept().await.unwrap();
        tokio::spawn(serve(socket));
    }
}

/// The answer to a setup method, if it needs one.
fn reply(method: &Method) -> Option<Method> {
    Some(match method {
        Method::ConnectionStartOk(_) => ConnectionTune {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 0,
        }
        .into(),
        Method::ConnectionOpen(_) => ConnectionOpenOk::default().into(),
        Method::ChannelOpen(_) => ChannelOpenOk::default().into(),
        Method::QueueDeclare(q) => QueueDeclareOk {
            queue: q.queue.clone(),
            message_count: 0,
            consumer_count: 0,
        }
        .into(),
        Method::QueuePurge(_) => QueuePurgeOk { message_count: 0 }.into(),
        Method::ExchangeDeclare(_) => ExchangeDeclareOk::default().into(),
        Method::QueueBind(_) => QueueBindOk::default().into(),
        Method::BasicQos(_) => BasicQosOk::default().into(),
        Method::ConfirmSelect(_) => ConfirmSelectOk::default().into(),
        Method::ChannelClose(_) => ChannelCloseOk::default().into(),
        Method::ConnectionClose(_) => ConnectionCloseOk::default().into(),
        _ => return None,
    })
}

async fn serve(mut socket: TcpStream) {
    let _ = socket.set_nodelay(true);
    let mut header = [0u8; 8];
    if socket.read_exact(&mut header).await.is_err() {
        return;
    }
    let mut out = BytesMut::new();
    encode_method(
        &mut out,
        0,
        &ConnectionStart {
            version_major: 0,
            version_minor: 9,
            server_properties: FieldTable::new(),
            mechanisms: Bytes::from_static(b"PLAIN"),
            locales: Bytes::from_static(b"en_US"),
        }
        .into(),
    )
    .unwrap();
    let mut buf = BytesMut::with_capacity(1 << 20);
    let mut publishes: u64 = 0;
    loop {
        if !out.is_empty() && socket.write_all(&out.split()).await.is_err() {
            return;
        }
        if socket.read_buf(&mut buf).await.unwrap_or(0) == 0 {
            eprintln!("connection done: {publishes} publishes discarded");
            return;
        }
        while let Ok(Some(frame)) = decode_frame(&mut buf, 0) {
            if let Frame::Method { channel, method } = frame {
                if matches!(method, Method::BasicPublish(_)) {
                    publishes += 1;
                } else if let Some(answer) = reply(&method) {
                    let closing = matches!(answer, Method::ConnectionCloseOk(_));
                    encode_method(&mut out, channel, &answer).unwrap();
                    if closing {
                        let _ = socket.write_all(&out.split()).await;
                        return;
                    }
                }
            }
        }
    }
}
