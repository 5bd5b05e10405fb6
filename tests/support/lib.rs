//! Shared helpers for the integration tests: a broker started in-process on
//! an ephemeral port with its own data directory, lapin connections to it, and
//! a raw-frame client for protocol-error tests. Every test file uses these;
//! none repeats setup code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use amqp_codec::{Frame, Method, decode_frame, encode_method};
use bytes::BytesMut;
use lapin::{Connection, ConnectionProperties};
use server::BrokerHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A broker for one test.
#[derive(Debug)]
pub struct TestBroker {
    handle: Option<BrokerHandle>,
    dir: Option<tempfile::TempDir>,
    data_dir: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl TestBroker {
    /// Starts a broker with a fresh data directory.
    pub async fn start() -> TestBroker {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let mut b = Self::start_in(&path).await;
        b.dir = Some(dir);
        b
    }

    /// Starts a broker on an existing data directory (restart tests).
    pub async fn start_in(data_dir: &Path) -> TestBroker {
        Self::start_with(data_dir, |_| {}).await
    }

    /// Starts a broker with adjusted settings.
    pub async fn start_with(
        data_dir: &Path,
        adjust: impl FnOnce(&mut server::Config),
    ) -> TestBroker {
        let mut config = server::Config {
            data_dir: data_dir.to_path_buf(),
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..server::Config::default()
        };
        adjust(&mut config);
        let handle = server::start(config).await.unwrap();
        TestBroker {
            addr: handle.addr,
            handle: Some(handle),
            dir: None,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Takes ownership of the temporary data directory (to restart on it).
    pub fn keep_dir(&mut self) -> tempfile::TempDir {
        self.dir.take().unwrap()
    }

    /// `amqp://guest:guest@127.0.0.1:port/%2f`
    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// A lapin connection as guest to vhost `/`.
    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.uri(), ConnectionProperties::default())
            .await
            .unwrap()
    }

    /// Graceful shutdown.
    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await.unwrap();
        }
    }
}

/// A hand-driven client for sending frames no well-behaved client would.
#[derive(Debug)]
pub struct RawClient {
    /// The socket.
    pub socket: TcpStream,
    buf: BytesMut,
}

impl RawClient {
    /// Connects without sending anything.
    pub async fn connect(addr: SocketAddr) -> RawClient {
        RawClient {
            socket: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
        }
    }

    /// Connects and completes the handshake as guest (frame_max 131072, no
    /// heartbeats), then opens channel 1.
    pub async fn open(addr: SocketAddr) -> RawClient {
        use amqp_codec::methods::*;
        let mut c = Self::connect(addr).await;
        c.send_raw(&amqp_codec::PROTOCOL_HEADER).await;
        assert!(matches!(c.method().await, Some(Method::ConnectionStart(_))));
        c.send(
            0,
            ConnectionStartOk {
                client_properties: Default::default(),
                mechanism: amqp_codec::ShortStr::from_static("PLAIN"),
                response: bytes::Bytes::from_static(b"\0guest\0guest"),
                locale: amqp_codec::ShortStr::from_static("en_US"),
            }
            .into(),
        )
        .await;
        assert!(matches!(c.method().await, Some(Method::ConnectionTune(_))));
        c.send(
            0,
            ConnectionTuneOk {
                channel_max: 2047,
                frame_max: 131_072,
                heartbeat: 0,
            }
            .into(),
        )
        .await;
        c.send(
            0,
            ConnectionOpen {
                virtual_host: amqp_codec::ShortStr::from_static("/"),
                ..Default::default()
            }
            .into(),
        )
        .await;
        assert!(matches!(
            c.method().await,
            Some(Method::ConnectionOpenOk(_))
        ));
        c.send(1, ChannelOpen::default().into()).await;
        assert!(matches!(c.method().await, Some(Method::ChannelOpenOk(_))));
        c
    }

    /// Sends octets as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).await.unwrap();
    }

    /// Sends one method frame.
    pub async fn send(&mut self, channel: u16, method: Method) {
        let mut buf = BytesMut::new();
        encode_method(&mut buf, channel, &method).unwrap();
        self.send_raw(&buf).await;
    }

    /// The next frame, or `None` once the server closed the socket.
    pub async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = decode_frame(&mut self.buf, 0).unwrap() {
                return Some(f);
            }
            if self.socket.read_buf(&mut self.buf).await.unwrap_or(0) == 0 {
                return None;
            }
        }
    }

    /// The next method, skipping heartbeats and content frames.
    pub async fn method(&mut self) -> Option<Method> {
        loop {
            match self.frame().await? {
                Frame::Method { method, .. } => return Some(method),
                _ => continue,
            }
        }
    }

    /// Octets the server sends until it closes the socket.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let mut out = self.buf.split().to_vec();
        let _ = self.socket.read_to_end(&mut out).await;
        out
    }
}
