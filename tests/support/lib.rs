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
            management: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            prometheus: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
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

    /// The AMQPS listener's address, if TLS is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.handle.as_ref().and_then(|h| h.tls_addr)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Hands the broker a temporary directory to delete when it is dropped.
    pub fn own_dir(&mut self, dir: tempfile::TempDir) {
        self.dir = Some(dir);
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

    /// `http://127.0.0.1:port` of the management API.
    pub fn management_url(&self) -> String {
        let addr = self.handle.as_ref().unwrap().management_addr.unwrap();
        format!("http://{addr}")
    }

    /// `http://127.0.0.1:port` of the Prometheus endpoint.
    pub fn prometheus_url(&self) -> String {
        let addr = self.handle.as_ref().unwrap().prometheus_addr.unwrap();
        format!("http://{addr}")
    }

    /// The broker itself (for assertions on its counters).
    pub fn broker(&self) -> &std::sync::Arc<server::Broker> {
        &self.handle.as_ref().unwrap().broker
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
    /// heartbeats) to vhost `/`, then opens channel 1.
    pub async fn open(addr: SocketAddr) -> RawClient {
        Self::open_with(addr, &[], "/").await
    }

    /// Like [`RawClient::open`], advertising client `capabilities`
    /// (`connection.blocked`, `consumer_cancel_notify`, ...) and opening `vhost`.
    pub async fn open_with(addr: SocketAddr, capabilities: &[&str], vhost: &str) -> RawClient {
        Self::open_tuned(addr, capabilities, vhost, 2047).await
    }

    /// Like [`RawClient::open_with`], answering `connection.tune` with
    /// `channel_max`.
    pub async fn open_tuned(
        addr: SocketAddr,
        capabilities: &[&str],
        vhost: &str,
        channel_max: u16,
    ) -> RawClient {
        use amqp_codec::methods::*;
        use amqp_codec::{FieldTable, FieldValue, ShortStr};
        let mut c = Self::connect(addr).await;
        c.send_raw(&amqp_codec::PROTOCOL_HEADER).await;
        assert!(matches!(c.method().await, Some(Method::ConnectionStart(_))));
        let caps: FieldTable = capabilities
            .iter()
            .map(|cap| (ShortStr::try_from(*cap).unwrap(), FieldValue::Bool(true)))
            .collect();
        let mut props = FieldTable::new();
        props.insert(
            ShortStr::from_static("capabilities"),
            FieldValue::Table(caps),
        );
        c.send(
            0,
            ConnectionStartOk {
                client_properties: props,
                mechanism: ShortStr::from_static("PLAIN"),
                response: bytes::Bytes::from_static(b"\0guest\0guest"),
                locale: ShortStr::from_static("en_US"),
            }
            .into(),
        )
        .await;
        assert!(matches!(c.method().await, Some(Method::ConnectionTune(_))));
        c.send(
            0,
            ConnectionTuneOk {
                channel_max,
                frame_max: 131_072,
                heartbeat: 0,
            }
            .into(),
        )
        .await;
        c.send(
            0,
            ConnectionOpen {
                virtual_host: ShortStr::try_from(vhost).unwrap(),
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

    /// The next frame, or `None` once the server closed the socket (see
    /// [`read_frame`]).
    pub async fn frame(&mut self) -> Option<Frame> {
        read_frame(&mut self.socket, &mut self.buf).await
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

    /// Splits into a reader and the write half, so a test can keep writing
    /// while the broker has stopped reading (flow control).
    pub fn split(self) -> (RawReader, tokio::net::tcp::OwnedWriteHalf) {
        let (read, write) = self.socket.into_split();
        (
            RawReader {
                socket: read,
                buf: self.buf,
            },
            write,
        )
    }

    /// Octets the server sends until it closes the socket.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let mut out = self.buf.split().to_vec();
        let _ = self.socket.read_to_end(&mut out).await;
        out
    }
}

/// The reply code and text of a channel or connection error lapin received.
pub fn amqp_error(e: &lapin::Error) -> Option<(u16, String)> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(err) => Some((err.get_id(), err.get_message().to_string())),
        _ => None,
    }
}

/// Asserts that `result` failed with reply `code` and a text containing `text`.
pub fn assert_amqp_error<T: std::fmt::Debug>(result: lapin::Result<T>, code: u16, text: &str) {
    let e = result.expect_err("expected an AMQP error");
    let (got, message) = amqp_error(&e).unwrap_or_else(|| panic!("not an AMQP error: {e:?}"));
    assert_eq!(got, code, "{message}");
    assert!(
        message.contains(text),
        "{message:?} does not contain {text:?}"
    );
}

/// Declares a queue with default options on a fresh channel and returns both.
pub async fn channel_with_queue(conn: &Connection, queue: &str) -> lapin::Channel {
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
    ch
}

/// Ready messages in `queue` (a passive declare's message count).
pub async fn ready_count(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// A quorum queue's declaration arguments: `x-queue-type: quorum`.
pub fn quorum_queue_args() -> lapin::types::FieldTable {
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Declares a durable queue with no arguments.
pub async fn declare_durable_queue(ch: &lapin::Channel, queue: &str) {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
}

/// Returns once the broker has processed everything sent on `ch` before
/// (a synchronous method's reply follows them on the same connection).
pub async fn flushed(ch: &lapin::Channel) {
    ch.exchange_declare(
        "amq.direct".into(),
        lapin::ExchangeKind::Direct,
        lapin::options::ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
}

/// Publishes `body` to the default exchange for `queue`.
pub async fn publish(ch: &lapin::Channel, queue: &str, body: &[u8]) {
    ch.basic_publish(
        "".into(),
        queue.into(),
        lapin::options::BasicPublishOptions::default(),
        body,
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap();
}

/// Publishes `body` persistently to the default exchange for `queue` on
/// confirm-mode channel `ch` and waits for its confirm, which must be an
/// ack: one at a time, each enqueue is an entry of its own in a replicated
/// queue's log.
pub async fn publish_acked(ch: &lapin::Channel, queue: &str, body: &[u8]) {
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
}

/// A no-ack consumer (tag `c`) on `queue`.
pub async fn consume_no_ack(ch: &lapin::Channel, queue: &str) -> lapin::Consumer {
    consume_no_ack_as(ch, queue, "c").await
}

/// A no-ack consumer with tag `tag` on `queue`.
pub async fn consume_no_ack_as(ch: &lapin::Channel, queue: &str, tag: &str) -> lapin::Consumer {
    ch.basic_consume(
        queue.into(),
        tag.into(),
        lapin::options::BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap()
}

/// Takes the next `n` deliveries of a consumer, failing after ten seconds.
pub async fn next_deliveries(
    consumer: &mut lapin::Consumer,
    n: usize,
) -> Vec<lapin::message::Delivery> {
    use futures_util::StreamExt;
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(std::time::Duration::from_secs(10), consumer.next())
            .await
            .expect("timed out waiting for a delivery")
            .expect("consumer ended")
            .unwrap();
        out.push(d);
    }
    out
}

/// fsyncs the broker's store has performed.
pub fn store_syncs(broker: &TestBroker) -> u64 {
    broker
        .broker()
        .store
        .stats()
        .syncs
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// The next frame from `socket` (bytes already read wait in `buf`), or
/// `None` once the server closed it. Fails the test if the broker sends
/// nothing for 30 seconds, so a missing reply is a failure rather than a
/// hung test run.
async fn read_frame(
    socket: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Option<Frame> {
    loop {
        if let Some(f) = decode_frame(buf, 0).unwrap() {
            return Some(f);
        }
        let read = tokio::time::timeout(std::time::Duration::from_secs(30), socket.read_buf(buf))
            .await
            .expect("no frame from the broker within 30 s");
        if read.unwrap_or(0) == 0 {
            return None;
        }
    }
}

/// The read half of a [`RawClient`].
#[derive(Debug)]
pub struct RawReader {
    socket: tokio::net::tcp::OwnedReadHalf,
    buf: BytesMut,
}

impl RawReader {
    /// The next frame, or `None` once the server closed the socket (see
    /// [`read_frame`]).
    pub async fn frame(&mut self) -> Option<Frame> {
        read_frame(&mut self.socket, &mut self.buf).await
    }
}

/// Asserts that the broker closed `ch` with `code` and a text containing
/// `text`, after a method whose refusal arrives asynchronously (a publish, or
/// a consume lapin answered before the `channel.close` that refused it).
///
/// The check is the next synchronous call on the channel. lapin reports the
/// broker's reply when that call is pending as the close arrives, but only
/// "channel closed" when it had processed the close before the call: then the
/// code and text are not available through lapin, and this asserts only that
/// the channel was closed (the raw-client tests check the texts themselves).
pub async fn assert_closed_by_broker<T: std::fmt::Debug>(
    first: lapin::Result<T>,
    ch: &lapin::Channel,
    code: u16,
    text: &str,
) {
    if first.is_err() {
        return assert_amqp_error(first, code, text);
    }
    let e = ch
        .basic_qos(1, lapin::options::BasicQosOptions::default())
        .await
        .expect_err("the channel is still open");
    match e.kind() {
        lapin::ErrorKind::InvalidChannelState(..) => {}
        _ => assert_amqp_error::<()>(Err(e), code, text),
    }
}

/// A raw client on channel 1 with `queue` declared (durable if asked) and
/// publisher confirms on, split for a flood: the writer goes to [`flood`],
/// the reader collects the confirms.
pub async fn confirming_publisher(
    addr: SocketAddr,
    queue: &'static str,
    durable: bool,
    capabilities: &[&str],
) -> (RawReader, tokio::net::tcp::OwnedWriteHalf) {
    use amqp_codec::ShortStr;
    use amqp_codec::methods::{ConfirmSelect, QueueDeclare};
    let mut c = RawClient::open_with(addr, capabilities, "/").await;
    c.send(
        1,
        QueueDeclare {
            queue: ShortStr::from_static(queue),
            durable,
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(c.method().await, Some(Method::QueueDeclareOk(_))));
    c.send(1, ConfirmSelect::default().into()).await;
    assert!(matches!(c.method().await, Some(Method::ConfirmSelectOk(_))));
    c.split()
}

/// Publishes `n` messages of `size` octets to `queue` on channel 1, in
/// writes of 100 messages, from a task: when the broker stops reading, the
/// task waits on TCP. Persistent messages if asked. Returns the writer.
pub fn flood(
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    queue: &'static str,
    n: u64,
    size: usize,
    persistent: bool,
) -> tokio::task::JoinHandle<tokio::net::tcp::OwnedWriteHalf> {
    use amqp_codec::methods::BasicPublish;
    use amqp_codec::{
        BasicProperties, ContentHeader, ShortStr, encode_body, encode_content_header,
    };
    tokio::spawn(async move {
        let header = ContentHeader {
            class_id: 60,
            weight: 0,
            body_size: size as u64,
            properties: BasicProperties {
                delivery_mode: persistent.then_some(2),
                ..Default::default()
            }
            .to_raw()
            .unwrap(),
        };
        let body = vec![7u8; size];
        let mut sent = 0;
        while sent < n {
            let mut buf = BytesMut::new();
            for _ in 0..(n - sent).min(100) {
                encode_method(
                    &mut buf,
                    1,
                    &BasicPublish {
                        routing_key: ShortStr::from_static(queue),
                        ..Default::default()
                    }
                    .into(),
                )
                .unwrap();
                encode_content_header(&mut buf, 1, &header).unwrap();
                encode_body(&mut buf, 1, &body, 131_072).unwrap();
                sent += 1;
            }
            writer.write_all(&buf).await.unwrap();
        }
        writer
    })
}

/// What a confirming publisher's reader saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Confirms {
    /// Highest delivery tag acknowledged (confirms are in order here).
    pub acked: u64,
    /// `connection.blocked` received.
    pub blocked: bool,
    /// `connection.unblocked` received.
    pub unblocked: bool,
}

impl RawReader {
    /// Reads confirms (and blocked/unblocked notices) until `done` says so,
    /// failing on a nack, a closed socket, or ten seconds without a frame.
    pub async fn confirms_until(
        &mut self,
        seen: &mut Confirms,
        mut done: impl FnMut(&Confirms) -> bool,
    ) {
        while !done(seen) {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(10), self.frame())
                .await
                .unwrap_or_else(|_| panic!("no progress from the broker; so far {seen:?}"));
            match frame {
                Some(Frame::Method { method, .. }) => match method {
                    Method::BasicAck(a) => seen.acked = seen.acked.max(a.delivery_tag),
                    Method::BasicNack(n) => panic!("nacked {}", n.delivery_tag),
                    Method::ConnectionBlocked(_) => seen.blocked = true,
                    Method::ConnectionUnblocked(_) => seen.unblocked = true,
                    _ => {}
                },
                Some(_) => {}
                None => panic!("socket closed; so far {seen:?}"),
            }
        }
    }
}

/// A broker in a child process, for what needs a process of its own: a
/// `kill -9`, or measuring its memory. The child is the calling test binary
/// re-run in broker mode: the binary must have a test named as given that
/// calls [`serve_if_child`] (it returns at once in a normal run).
#[derive(Debug)]
pub struct ChildBroker {
    /// The process.
    pub child: std::process::Child,
    /// Its AMQP address, `host:port`.
    pub addr: String,
}

const CHILD_DIR_ENV: &str = "WARREN_TEST_CHILD_DIR";
const CHILD_WATERMARK_ENV: &str = "WARREN_TEST_CHILD_WATERMARK";

impl ChildBroker {
    /// Starts the child on `dir` (a memory watermark if given) and waits
    /// until it listens.
    pub fn spawn(child_test: &str, dir: &Path, memory_high_watermark: Option<u64>) -> ChildBroker {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", child_test, "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        if let Some(w) = memory_high_watermark {
            cmd.env(CHILD_WATERMARK_ENV, w.to_string());
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("broker child exited").unwrap();
            // libtest prints "test <name> ... " on the same line first.
            if let Some((_, a)) = line.split_once("listening ") {
                break a.trim().to_owned();
            }
        };
        ChildBroker { child, addr }
    }

    /// `amqp://guest:guest@addr/%2f`
    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`).
    pub fn memory_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap()
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// `kill -9` and reap.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// Broker mode of a test binary (see [`ChildBroker`]): when this process was
/// started by [`ChildBroker::spawn`], runs a broker on the given directory,
/// prints its address and serves until killed. Otherwise returns at once.
pub fn serve_if_child() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let watermark = std::env::var(CHILD_WATERMARK_ENV)
        .ok()
        .map(|w| w.parse::<u64>().unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = TestBroker::start_with(Path::new(&dir), |c| {
            if let Some(w) = watermark {
                c.memory_high_watermark = w;
            }
        })
        .await;
        println!("listening {}", b.addr);
        std::future::pending::<()>().await;
    });
}

const CLUSTER_NODE_ENV: &str = "WARREN_TEST_CLUSTER_NODE";

/// A private network for a test cluster: a bridge with an address in the
/// root namespace (where the test runs) and one network namespace per node,
/// each with one address on the bridge. Links between nodes are cut with
/// blackhole routes inside their namespaces; the test keeps reaching every
/// node. Everything is removed on drop. Needs root (CI runs as root).
#[derive(Debug)]
pub struct NetLab {
    tag: String,
    /// Node `i`'s address.
    pub hosts: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetLab {
    /// A bridge and `n` namespaces, or why not (not root, no `ip`).
    pub fn new(n: usize) -> Result<NetLab, String> {
        let tag = format!("{:04x}", rand_below(0x10000));
        let subnet = format!("10.231.{}", rand_below(250) + 1);
        let lab = NetLab {
            tag,
            hosts: (0..n).map(|i| format!("{subnet}.{}", 11 + i)).collect(),
        };
        let br = lab.bridge();
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 0..n {
            let (ns, outer, inner) = (lab.namespace(i), lab.outer(i), lab.inner(i));
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "master", &br, "up"])?;
            let host = format!("{}/24", lab.hosts[i]);
            ip(&["-n", &ns, "addr", "add", &host, "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    fn bridge(&self) -> String {
        format!("wb{}", self.tag)
    }

    /// Node `i`'s namespace.
    pub fn namespace(&self, i: usize) -> String {
        format!("warren-{}-{i}", self.tag)
    }

    fn outer(&self, i: usize) -> String {
        format!("wv{}{i}", self.tag)
    }

    fn inner(&self, i: usize) -> String {
        format!("wp{}{i}", self.tag)
    }

    /// Cuts the link between nodes `a` and `b` (both ways).
    pub fn cut(&self, a: usize, b: usize) {
        self.blackholes("add", a, b);
    }

    /// Heals the link between nodes `a` and `b`.
    pub fn heal(&self, a: usize, b: usize) {
        self.blackholes("del", a, b);
    }

    /// Adds or deletes the blackhole routes between `a` and `b`.
    fn blackholes(&self, op: &str, a: usize, b: usize) {
        for (from, to) in [(a, b), (b, a)] {
            let route = format!("{}/32", self.hosts[to]);
            ip(&[
                "-n",
                &self.namespace(from),
                "route",
                op,
                "blackhole",
                &route,
            ])
            .unwrap();
        }
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        // Each pair goes with its outer end: the namespace may outlive its
        // name for minutes (the kernel's orphaned sockets still retrying
        // towards a peer that was cut), and the pair with it.
        for i in 0..self.hosts.len() {
            let _ = ip(&["link", "del", &self.outer(i)]);
            let _ = ip(&["netns", "del", &self.namespace(i)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

/// A free TCP port on loopback (bound and released: a test's cluster
/// ports must be known before the nodes start, since each is the others'
/// seed).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port for a test node's cluster listener, outside Linux's
/// ephemeral range (32768-60999): it is chosen here and bound later by the
/// child, and in between no other test's `bind(0)` can be handed it.
pub fn free_cluster_port() -> u16 {
    loop {
        let port = 20_000 + rand_below(10_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A pseudo-random number below `n` (no extra dependency for tests).
fn rand_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() % n
}

/// One node of a [`TestCluster`]: a child process running the broker and
/// its cluster side (see [`serve_cluster_node_if_child`]).
#[derive(Debug)]
pub struct ClusterChild {
    /// The process.
    pub child: std::process::Child,
    /// Its AMQP address, `host:port`.
    pub amqp: String,
    /// Its management API's base URL.
    pub api: String,
    /// Its Prometheus endpoint's base URL (`/metrics` below it).
    pub metrics: String,
}

impl ClusterChild {
    /// `amqp://user:pass@addr/vhost` (vhost percent-encoded by the caller).
    pub fn uri(&self, user: &str, pass: &str, vhost: &str) -> String {
        format!("amqp://{user}:{pass}@{}/{vhost}", self.amqp)
    }
}

/// Nodes started as child processes on loopback, each with its own data
/// directory, cluster port and the others as seeds; killed (and their
/// directories removed) on drop.
#[derive(Debug)]
pub struct TestCluster {
    child_test: String,
    dir: tempfile::TempDir,
    secret_file: PathBuf,
    ports: Vec<u16>,
    /// Each node's address (its node name's host).
    hosts: Vec<String>,
    /// The private network the nodes run in, if any.
    pub lab: Option<NetLab>,
    /// The user the cluster creates when it forms.
    pub user: (String, String),
    /// The nodes (None while stopped).
    pub nodes: Vec<Option<ClusterChild>>,
    /// Nodes started alone (no seeds, not a cluster node until they join
    /// one), with the AMQP and management ports they keep across restarts.
    alone: Vec<Option<(u16, u16)>>,
    /// Each node's TLS files for its links (certificate, key, CA), if the
    /// cluster uses TLS.
    pub tls: Vec<Option<[PathBuf; 3]>>,
    /// Every node's `queue_flow_limit` (octets; 0: none).
    queue_flow_limit: u64,
}

impl TestCluster {
    /// Starts `n` nodes, named `n1@127.0.0.1` ..., through the test binary's
    /// `child_test` (which calls [`serve_cluster_node_if_child`]).
    pub fn start(child_test: &str, n: usize) -> TestCluster {
        Self::start_on(child_test, n, None)
    }

    /// Starts `n` nodes, node `i` in network namespace `i` of `lab` (named
    /// `n1@<its address>` ...); the cluster's user is `admin`, since guest
    /// may log in from loopback only.
    pub fn start_in_lab(child_test: &str, lab: NetLab) -> TestCluster {
        let n = lab.hosts.len();
        Self::start_on(child_test, n, Some(lab))
    }

    fn start_on(child_test: &str, n: usize, lab: Option<NetLab>) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, "a-test-cluster-secret-of-some-length").unwrap();
        let ports = (0..n).map(|_| free_cluster_port()).collect();
        let (hosts, user) = match &lab {
            Some(lab) => (lab.hosts.clone(), ("admin", "admin")),
            None => (vec!["127.0.0.1".to_owned(); n], ("guest", "guest")),
        };
        let mut c = TestCluster {
            child_test: child_test.to_owned(),
            dir,
            secret_file,
            ports,
            hosts,
            lab,
            user: (user.0.to_owned(), user.1.to_owned()),
            nodes: (0..n).map(|_| None).collect(),
            alone: vec![None; n],
            tls: vec![None; n],
            queue_flow_limit: 0,
        };
        for i in 0..n {
            c.spawn(i, None);
        }
        c
    }

    /// Starts `n` nodes on loopback, each with `queue_flow_limit` octets.
    pub fn start_flow_limited(child_test: &str, n: usize, queue_flow_limit: u64) -> TestCluster {
        let mut c = Self::start_on(child_test, 0, None);
        c.queue_flow_limit = queue_flow_limit;
        for _ in 0..n {
            c.ports.push(free_cluster_port());
            c.hosts.push("127.0.0.1".into());
            c.nodes.push(None);
            c.alone.push(None);
            c.tls.push(None);
        }
        for i in 0..n {
            c.spawn(i, None);
        }
        c
    }

    /// Starts `n` nodes on loopback whose links are mutual TLS: a CA made
    /// here signs each node's certificate (for 127.0.0.1).
    pub fn start_tls(child_test: &str, n: usize) -> TestCluster {
        let mut c = Self::start_on(child_test, 0, None);
        let (ca, issuer) = test_ca(c.dir.path(), "ca");
        for i in 0..n {
            let (cert, key) = node_cert(c.dir.path(), &format!("n{}", i + 1), &issuer);
            c.ports.push(free_cluster_port());
            c.hosts.push("127.0.0.1".into());
            c.nodes.push(None);
            c.alone.push(None);
            c.tls.push(Some([cert, key, ca.clone()]));
        }
        for i in 0..n {
            c.spawn(i, None);
        }
        c
    }

    /// A certificate and key for 127.0.0.1 signed by a CA of its own (one
    /// the cluster does not trust), and that CA: a would-be node with them
    /// is refused.
    pub fn untrusted_tls(&self) -> [PathBuf; 3] {
        let (ca, issuer) = test_ca(self.dir.path(), "rogue-ca");
        let (cert, key) = node_cert(self.dir.path(), "rogue", &issuer);
        [cert, key, ca]
    }

    /// Starts one more node on loopback, alone: no seeds, so not a cluster
    /// node (it has the cluster's secret, so `join_cluster` can make it
    /// one). Its AMQP and management ports stay the same when it restarts
    /// itself to join. Returns its index.
    pub fn add_alone(&mut self) -> usize {
        let i = self.nodes.len();
        self.ports.push(free_cluster_port());
        self.hosts.push("127.0.0.1".into());
        self.nodes.push(None);
        self.alone
            .push(Some((free_cluster_port(), free_cluster_port())));
        self.tls.push(None);
        self.spawn(i, None);
        i
    }

    /// Node `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{}", i + 1))
    }

    /// Node `i`'s cluster address.
    pub fn cluster_addr(&self, i: usize) -> String {
        format!("{}:{}", self.hosts[i], self.ports[i])
    }

    /// Node `i` (running).
    pub fn node(&self, i: usize) -> &ClusterChild {
        self.nodes[i].as_ref().expect("node is running")
    }

    /// Starts node `i` (with another secret file if given) and waits until
    /// its AMQP listener is up (formation goes on in the background).
    pub fn spawn(&mut self, i: usize, secret_file: Option<&Path>) {
        use std::io::BufRead;
        let mut child = self.command(i, secret_file).spawn().unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let (amqp, api, metrics) = loop {
            let line = lines.next().expect("cluster node exited").unwrap();
            if let Some((_, rest)) = line.split_once("listening ") {
                let mut parts = rest.split_whitespace();
                break (
                    parts.next().unwrap().to_owned(),
                    format!("http://{}", parts.next().unwrap()),
                    format!("http://{}", parts.next().unwrap()),
                );
            }
        };
        // The node prints again when it restarts itself (join_cluster): the
        // pipe stays read so that it can.
        std::thread::spawn(move || lines.for_each(drop));
        self.nodes[i] = Some(ClusterChild {
            child,
            amqp,
            api,
            metrics,
        });
    }

    /// Starts node `i`, which must refuse to start: waits until it exited,
    /// unsuccessfully, without listening, and returns its log.
    pub fn spawn_refused(&mut self, i: usize) -> String {
        use std::io::BufRead;
        let mut child = self.command(i, None).spawn().unwrap();
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines {
            let line = line.unwrap();
            assert!(
                !line.contains("listening "),
                "node {} started: {line}",
                i + 1
            );
        }
        let status = child.wait().unwrap();
        assert!(!status.success(), "node {} exited with {status}", i + 1);
        self.log(i)
    }

    /// The command that runs node `i` (its stdout piped, its log to
    /// `n<i>.log`).
    fn command(&self, i: usize, secret_file: Option<&Path>) -> std::process::Command {
        let peers: Vec<String> = match self.alone[i] {
            Some(_) => Vec::new(),
            None => (0..self.ports.len())
                .filter(|&j| self.alone[j].is_none())
                .map(|j| self.cluster_addr(j))
                .collect(),
        };
        let spec = serde_json::json!({
            "ports": self.alone[i].map(|(amqp, api)| [amqp, api]),
            "tls": self.tls[i],
            "queue_flow_limit": self.queue_flow_limit,
            "dir": self.data_dir(i),
            "name": format!("n{}@{}", i + 1, self.hosts[i]),
            "host": self.hosts[i],
            "user": [self.user.0, self.user.1],
            "cluster_port": self.ports[i],
            "peers": peers,
            "secret_file": secret_file.unwrap_or(&self.secret_file),
        });
        let log = std::fs::File::create(self.dir.path().join(format!("n{}.log", i + 1))).unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut cmd = match &self.lab {
            // `ip netns exec` execs the binary: the child is the node.
            Some(lab) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", &lab.namespace(i)]).arg(exe);
                c
            }
            None => std::process::Command::new(exe),
        };
        cmd.args([
            "--exact",
            &self.child_test,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CLUSTER_NODE_ENV, spec.to_string())
        .env("RUST_LOG", "info,openraft=warn")
        .stdout(std::process::Stdio::piped())
        .stderr(log);
        cmd
    }

    /// Stops node `i` as an operator does (SIGTERM) and waits until it
    /// has exited, successfully.
    pub fn stop(&mut self, i: usize) {
        self.signal(i, "TERM");
        if let Some(mut n) = self.nodes[i].take() {
            let status = n.child.wait().unwrap();
            assert!(status.success(), "node {} stopped with {status}", i + 1);
        }
    }

    /// `kill -9` node `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut n) = self.nodes[i].take() {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }

    /// Sends signal `sig` (`STOP`, `CONT`) to node `i`'s process.
    pub fn signal(&self, i: usize, sig: &str) {
        let pid = self.node(i).child.id().to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig} {pid}");
    }

    /// Node `i`'s log so far (for assertion messages).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("n{}.log", i + 1))).unwrap_or_default()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// Cluster-node mode of a test binary (see [`TestCluster`]): when started
/// by it, runs a broker with its cluster side, prints `listening <amqp>
/// <management>` and serves until killed. Otherwise returns at once.
pub fn serve_cluster_node_if_child() {
    let Ok(spec) = std::env::var(CLUSTER_NODE_ENV) else {
        return;
    };
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let text = |k: &str| spec[k].as_str().unwrap().to_owned();
    let dir = PathBuf::from(text("dir"));
    let name = text("name");
    let secret: Vec<u8> = std::fs::read(text("secret_file")).unwrap();
    let peers: Vec<String> = spec["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    let cluster_port = spec["cluster_port"].as_u64().unwrap() as u16;
    let host: std::net::IpAddr = spec["host"].as_str().unwrap().parse().unwrap();
    let user = (
        spec["user"][0].as_str().unwrap().to_owned(),
        spec["user"][1].as_str().unwrap().to_owned(),
    );
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The AMQP port is chosen first so the cluster can advertise it;
        // it stays bound until the broker takes it.
        let fixed = spec["ports"]
            .as_array()
            .map(|p| (p[0].as_u64().unwrap() as u16, p[1].as_u64().unwrap() as u16));
        let amqp_hold = std::net::TcpListener::bind((host, fixed.map_or(0, |f| f.0))).unwrap();
        let amqp_port = amqp_hold.local_addr().unwrap().port();
        let settings_name = name.clone();
        let secret: std::sync::Arc<[u8]> = secret.into();
        let joined = cluster::joining::stored_seeds(&dir).unwrap().is_some();
        let settings = cluster::ClusterSettings {
            node_name: name.clone(),
            cluster_name: "test".into(),
            bind: SocketAddr::from((host, cluster_port)),
            advertise: None,
            peers,
            peer_dns: Vec::new(),
            secret: secret.clone(),
            data_dir: dir.clone(),
            amqp_addr: format!("{host}:{amqp_port}"),
            default_user: user,
            tls: spec["tls"].as_array().map(|f| {
                let path = |i: usize| PathBuf::from(f[i].as_str().unwrap());
                cluster::link::LinkTls::new(&path(0), &path(1), &path(2)).unwrap()
            }),
        };
        let joiner = cluster::Joiner::new(
            dir.clone(),
            name,
            "test".into(),
            Some(secret),
            cluster::DEFAULT_CLUSTER_PORT,
        )
        .with_tls(settings.tls.clone());
        // A node started alone is not a cluster node until it joins one.
        let cluster = if settings.peers.is_empty() && !joined {
            None
        } else {
            // As the broker binary: the error logged, and an exit.
            match cluster::start(settings).await {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!("cannot start the cluster node: {e}");
                    std::process::exit(1);
                }
            }
        };
        let config = server::Config {
            data_dir: dir,
            node_name: settings_name,
            bind: SocketAddr::from((host, amqp_port)),
            management: Some(SocketAddr::from((host, fixed.map_or(0, |f| f.1)))),
            prometheus: Some(SocketAddr::from((host, 0))),
            queue_flow_limit: spec["queue_flow_limit"].as_u64().unwrap_or(0),
            ..server::Config::default()
        };
        drop(amqp_hold);
        let handle = server::start_with(config, cluster.as_ref().map(|c| c.parts()))
            .await
            .unwrap();
        if let Some(c) = &cluster {
            c.serve(&handle.broker);
            joiner.attach(&c.node);
        }
        let _ = handle.broker.cluster_join.set(std::sync::Arc::new(joiner));
        println!(
            "listening {} {} {}",
            handle.addr,
            handle.management_addr.unwrap(),
            handle.prometheus_addr.unwrap()
        );
        // Serves until killed or stopped (SIGTERM: shut down as the broker
        // binary does), or restarts itself as the broker binary does after
        // a join_cluster.
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        let restart = tokio::select! {
            _ = handle.broker.restart_requested() => true,
            _ = terminate.recv() => false,
        };
        handle.shutdown().await.unwrap();
        if let Some(c) = cluster {
            c.shutdown().await;
        }
        if restart {
            panic!("cannot restart: {}", cluster::joining::restart_process());
        }
    });
}

/// A CA (its PEM written to `<dir>/<name>.pem`) and its issuer.
fn test_ca(dir: &Path, name: &str) -> (PathBuf, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("Warren test {name}"));
    let cert = params.self_signed(&key).unwrap();
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, cert.pem()).unwrap();
    (path, rcgen::Issuer::new(params, key))
}

/// A certificate for 127.0.0.1 signed by `issuer`: `<dir>/<name>.pem` and
/// `<dir>/<name>.key`.
fn node_cert(
    dir: &Path,
    name: &str,
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}
