//! One client connection: the handshake, then one task reading frames and
//! driving its channels' state machines, with a separate writer draining the
//! connection's [`Outbox`].
//!
//! ```text
//!  header ─▶ start ─▶ start-ok (auth) ─▶ tune ─▶ tune-ok ─▶ open ─▶ open-ok ─▶ running
//!  running: frames ─▶ channel 0 (connection.close, update-secret)
//!                  └▶ channel N ─▶ CommandAssembler ─▶ Channel::handle
//!  soft error ─▶ channel.close      hard error ─▶ connection.close ─▶ wait close-ok ─▶ done
//! ```
//!
//! Publisher confirms are flushed after each batch of frames read from the
//! socket, so one read of many publishes yields one coalesced `basic.ack`.
//!
//! A command that waits for a commit (a durable declare, bind, unbind or
//! delete, `tx.commit`; under a cluster a network round trip) is handled
//! off the read loop: its channel leaves `channels` for the wait, the frames
//! that arrive for it meanwhile are held in order and handled when it is
//! back, and every other channel goes on.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use amqp_codec::methods::*;
use amqp_codec::{
    FieldTable, FieldValue, Frame, Method, PROTOCOL_HEADER, ProtocolHeaderCheck, ShortStr,
    check_protocol_header, decode_frame, encode_heartbeat, encode_method, frame_constant,
};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

use crate::broker::Broker;
use crate::channel::{Channel, ChannelOutcome, Handled};
use crate::error::{AmqpError, Scope};
use crate::outbox::{Cork, Outbox};
pub use crate::session::ConnectionShared;
use crate::vhost::Vhost;
use queue_store::FlowGate;

fn server_properties() -> FieldTable {
    let s = ShortStr::from_static;
    let caps: FieldTable = [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ]
    .into_iter()
    .map(|c| (s(c), FieldValue::Bool(true)))
    .collect();
    [
        (s("product"), FieldValue::from("Warren")),
        (s("version"), FieldValue::from(env!("CARGO_PKG_VERSION"))),
        (s("platform"), FieldValue::from("Rust")),
        (s("copyright"), FieldValue::from("The Warren authors")),
        (s("information"), FieldValue::from("An AMQP 0-9-1 broker")),
        (s("cluster_name"), FieldValue::from("warren")),
        (s("capabilities"), FieldValue::Table(caps)),
    ]
    .into_iter()
    .collect()
}

struct Reader {
    socket: Box<dyn AsyncRead + Send + Unpin>,
    buf: BytesMut,
    /// Room made before each read: small for a quiet connection, doubled
    /// (up to [`READ_MAX`]) each time a read fills it.
    read_size: usize,
}

/// First read buffer of a connection: an idle connection holds no more.
const READ_MIN: usize = 2 * 1024;
/// Largest room made for one read (a busy publisher's).
const READ_MAX: usize = 64 * 1024;

impl Reader {
    fn new(socket: Box<dyn AsyncRead + Send + Unpin>) -> Reader {
        Reader {
            socket,
            buf: BytesMut::with_capacity(READ_MIN),
            read_size: READ_MIN,
        }
    }

    /// Makes room for the next read once the buffer is (nearly) full. (Its
    /// frames are shared with the messages cut from it, so the room usually
    /// comes as a new allocation: one per `read_size` octets read.)
    fn prepare(&mut self) {
        if self.buf.capacity() - self.buf.len() < READ_MIN / 4 {
            self.buf.reserve(self.read_size);
        }
    }

    /// Notes that a read returned `n` octets: a read that filled the room
    /// asks for more next time.
    fn note_read(&mut self, n: usize) {
        if self.buf.capacity() == self.buf.len() && n > 0 {
            self.read_size = (self.read_size * 2).min(READ_MAX);
        }
    }

    /// Reads until one whole frame is buffered.
    async fn frame(&mut self, frame_max: u32) -> Result<Option<Frame>, AmqpError> {
        loop {
            if let Some(frame) = decode_frame(&mut self.buf, frame_max)? {
                return Ok(Some(frame));
            }
            self.prepare();
            match self.socket.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(n) => self.note_read(n),
            }
        }
    }
}

fn write_method(outbox: &Arc<Outbox>, channel: u16, method: &Method) {
    outbox.write(|buf| {
        if let Err(e) = encode_method(buf, channel, method) {
            tracing::error!(error = %e, "cannot encode {}", method.name());
        }
    });
}

fn close_method(e: &AmqpError) -> Method {
    Method::ConnectionClose(ConnectionClose {
        reply_code: e.code,
        reply_text: ShortStr::try_from(e.reply_text()).unwrap_or_default(),
        class_id: e.class_id,
        method_id: e.method_id,
    })
}

/// Serves one accepted plain socket to the end.
pub async fn serve(broker: Arc<Broker>, socket: TcpStream, peer: SocketAddr) {
    let local = socket.local_addr().unwrap_or(broker.config.bind);
    let (read, write) = socket.into_split();
    // Senders write an idle connection's frames themselves (see outbox.rs).
    let outbox = Arc::new(Outbox::tcp(write));
    let writer = {
        let outbox = outbox.clone();
        tokio::spawn(async move { outbox.run_tcp_writer().await })
    };
    serve_io(
        broker,
        Box::new(read),
        (outbox, writer),
        (peer, local),
        Tls::None,
    )
    .await;
}

/// What the transport says about the client.
#[derive(Debug, Clone)]
enum Tls {
    /// A plain TCP connection.
    None,
    /// TLS, with the verified client certificate's identity if there is one.
    Verified(Option<String>),
}

/// Serves one connection after its TLS handshake. A verified client
/// certificate's identity is offered to SASL EXTERNAL.
pub async fn serve_tls(
    broker: Arc<Broker>,
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
) {
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(crate::tls::peer_identity);
    let local = stream
        .get_ref()
        .0
        .local_addr()
        .unwrap_or(broker.config.bind);
    let (read, write) = tokio::io::split(stream);
    let outbox = Arc::new(Outbox::default());
    let writer = {
        let outbox = outbox.clone();
        tokio::spawn(async move { outbox.run_writer(write).await })
    };
    serve_io(
        broker,
        Box::new(read),
        (outbox, writer),
        (peer, local),
        Tls::Verified(identity),
    )
    .await;
}

/// Serves a connection whose frames go out through `outbox`, which
/// `writer` (the outbox's writer task) sends.
async fn serve_io(
    broker: Arc<Broker>,
    read: Box<dyn AsyncRead + Send + Unpin>,
    (outbox, writer): (Arc<Outbox>, tokio::task::JoinHandle<std::io::Result<()>>),
    (peer, local): (SocketAddr, SocketAddr),
    tls: Tls,
) {
    let mut reader = Reader::new(read);
    let timeout = broker.config.handshake_timeout;
    // (A broker shutting down does not wait out a handshake in progress.)
    let handshake = tokio::select! {
        done = tokio::time::timeout(
            timeout,
            handshake(&broker, &mut reader, &outbox, (peer, local), &tls),
        ) => done,
        () = broker.shutdown.cancelled() => Ok(Ok(None)),
    };
    match handshake {
        Ok(Ok(Some(Opened {
            shared,
            vhost,
            heartbeat,
            slot,
        }))) => {
            tracing::info!(connection = shared.id, %peer, user = %shared.user, "connection opened");
            let mut conn = Connection {
                broker: broker.clone(),
                vhost,
                shared: shared.clone(),
                channels: rustc_hash::FxHashMap::default(),
                waiting: rustc_hash::FxHashMap::default(),
                in_flight: FuturesUnordered::new(),
                held: 0,
                heartbeat,
                client_closed: false,
                _slot: slot,
                partial: PartialBodies {
                    broker: broker.clone(),
                    id: shared.id,
                    held: 0,
                },
            };
            conn.run(&mut reader).await;
            conn.cleanup().await;
            broker.live_connections.remove(&shared.id);
            broker.metrics.connections_closed.inc();
            tracing::info!(connection = shared.id, %peer, "connection closed");
            let client_closed = conn.client_closed;
            // Its place among the open connections and the bodies it was
            // receiving are given back now, not after the socket drains.
            drop(conn);
            if client_closed {
                // As RabbitMQ: after close-ok, go on reading (and dropping)
                // until the client closes its side, so frames it sent before
                // seeing the close-ok do not meet a reset socket.
                outbox.close();
                let _ = writer.await;
                drain_until_closed(&broker, &mut reader).await;
                return;
            }
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "handshake refused");
            write_method(&outbox, 0, &close_method(&e));
        }
        Err(_) => tracing::info!(%peer, "handshake timed out"),
    }
    outbox.close();
    let _ = writer.await;
}

/// How long a client has to close its side after the broker's close-ok
/// (RabbitMQ's closing timeout).
const CLOSING_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads and drops whatever the client still sends until it closes the
/// socket, the closing timeout passes or the broker shuts down.
async fn drain_until_closed(broker: &Broker, reader: &mut Reader) {
    let drain = async {
        loop {
            reader.buf.clear();
            reader.prepare();
            match reader.socket.read_buf(&mut reader.buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(CLOSING_TIMEOUT, drain) => {}
        _ = broker.shutdown.cancelled() => {}
    }
}

/// A place among the broker's and its vhost's open connections (what the
/// connection limits count), given back when dropped, however the
/// connection ends.
#[derive(Debug)]
struct ConnectionSlot {
    broker: Arc<Broker>,
    vhost: Arc<Vhost>,
}

impl ConnectionSlot {
    /// Takes a place; also returns how many the broker and the vhost now have.
    fn take(broker: &Arc<Broker>, vhost: &Arc<Vhost>) -> (ConnectionSlot, usize, usize) {
        let open = broker.connections.fetch_add(1, Ordering::AcqRel) + 1;
        let in_vhost = vhost.connections.fetch_add(1, Ordering::AcqRel) + 1;
        let slot = ConnectionSlot {
            broker: broker.clone(),
            vhost: vhost.clone(),
        };
        (slot, open, in_vhost)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.broker.connections.fetch_sub(1, Ordering::AcqRel);
        self.vhost.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection the handshake opened.
struct Opened {
    shared: Arc<ConnectionShared>,
    vhost: Arc<Vhost>,
    heartbeat: u16,
    slot: ConnectionSlot,
}

/// Runs the handshake; `Ok(None)` when the peer went away or was refused
/// without a close (wrong protocol header, failed login without
/// `authentication_failure_close`).
async fn handshake(
    broker: &Arc<Broker>,
    reader: &mut Reader,
    outbox: &Arc<Outbox>,
    (peer, local): (SocketAddr, SocketAddr),
    tls: &Tls,
) -> Result<Option<Opened>, AmqpError> {
    // EXTERNAL is offered on every TLS connection (as RabbitMQ with its SSL
    // auth mechanism) and succeeds only with a verified client certificate.
    let (offer_external, identity) = match tls {
        Tls::None => (false, None),
        Tls::Verified(id) => (true, id.as_deref()),
    };
    loop {
        match check_protocol_header(&reader.buf) {
            ProtocolHeaderCheck::Valid => break,
            ProtocolHeaderCheck::Invalid => {
                outbox.write(|b| b.put_slice(&PROTOCOL_HEADER));
                return Ok(None);
            }
            ProtocolHeaderCheck::Incomplete => {
                match reader.socket.read_buf(&mut reader.buf).await {
                    Ok(0) | Err(_) => return Ok(None),
                    Ok(_) => {}
                }
            }
        }
    }
    // `Valid` means the 8 octets are buffered.
    let _ = reader.buf.split_to(PROTOCOL_HEADER.len());
    write_method(
        outbox,
        0,
        &Method::ConnectionStart(ConnectionStart {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            mechanisms: Bytes::from_static(if offer_external {
                b"EXTERNAL PLAIN AMQPLAIN"
            } else {
                b"PLAIN AMQPLAIN"
            }),
            locales: Bytes::from_static(b"en_US"),
        }),
    );
    let min = frame_constant::MIN_SIZE;
    let Some(Frame::Method {
        method: Method::ConnectionStartOk(start_ok),
        ..
    }) = reader.frame(min).await?
    else {
        return Err(AmqpError::command_invalid("expected connection.start-ok"));
    };
    let caps = match start_ok.client_properties.get("capabilities") {
        Some(FieldValue::Table(t)) => t.clone(),
        _ => FieldTable::new(),
    };
    let cap = |name: &str| matches!(caps.get(name), Some(FieldValue::Bool(true)));
    let (user, pass) = credentials(&start_ok.mechanism, &start_ok.response, identity).ok_or_else(|| {
        AmqpError::access_refused_connection(format!(
            "Login was refused using authentication mechanism {}. For details see the broker logfile.",
            start_ok.mechanism
        ))
    })?;
    let checked = if start_ok.mechanism.as_str() == "EXTERNAL" {
        match broker.auth.user(&user) {
            Some(_) => Ok(()),
            None => Err(format!("certificate user '{user}' does not exist")),
        }
    } else {
        broker.authenticate(&user, &pass, peer)
    };
    if let Err(reason) = checked {
        tracing::warn!(%peer, user = %user, %reason, "authentication failed");
        // A short delay against brute force.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if cap("authentication_failure_close") {
            return Err(AmqpError::access_refused_connection(format!(
                "Login was refused using authentication mechanism {}. For details see the broker logfile.",
                start_ok.mechanism
            )));
        }
        return Ok(None);
    }
    let config = &broker.config;
    write_method(
        outbox,
        0,
        &Method::ConnectionTune(ConnectionTune {
            channel_max: config.channel_max,
            frame_max: config.frame_max,
            heartbeat: config.heartbeat,
        }),
    );
    let Some(Frame::Method {
        method: Method::ConnectionTuneOk(tune),
        ..
    }) = reader.frame(min).await?
    else {
        return Err(AmqpError::command_invalid("expected connection.tune-ok"));
    };
    // Values outside the offer: the spec says to close the socket without
    // a connection.close, and RabbitMQ 3.10 does (frame_max 0, "no limit",
    // included: it is above any offer).
    let refusal = if tune.frame_max == 0 || tune.frame_max > config.frame_max {
        Some(format!(
            "frame_max={} > {} max size",
            tune.frame_max, config.frame_max
        ))
    } else if tune.frame_max < frame_constant::MIN_SIZE {
        Some(format!(
            "frame_max={} < {} min size",
            tune.frame_max,
            frame_constant::MIN_SIZE
        ))
    } else if config.channel_max != 0 && tune.channel_max > config.channel_max {
        Some(format!(
            "channel_max={} > {} max channels",
            tune.channel_max, config.channel_max
        ))
    } else {
        None
    };
    if let Some(reason) = refusal {
        tracing::info!(%peer, %reason, "tune-ok outside the offer: closing the socket");
        return Ok(None);
    }
    let Some(Frame::Method {
        method: Method::ConnectionOpen(open),
        ..
    }) = reader.frame(tune.frame_max).await?
    else {
        return Err(AmqpError::command_invalid("expected connection.open"));
    };
    let vhost = broker.vhost(&open.virtual_host).ok_or_else(|| {
        AmqpError::not_allowed(format!("vhost '{}' not found", open.virtual_host))
            .on(ConnectionOpen::CLASS_ID, ConnectionOpen::METHOD_ID)
    })?;
    if !broker.auth.may_open(&user, &open.virtual_host) {
        return Err(AmqpError::not_allowed(format!(
            "access to vhost '{}' refused for user '{user}'",
            open.virtual_host
        ))
        .on(ConnectionOpen::CLASS_ID, ConnectionOpen::METHOD_ID));
    }
    let max = broker.config.max_connections;
    let vhost_max = vhost.limits.lock().max_connections;
    let (slot, open_now, vhost_now) = ConnectionSlot::take(broker, &vhost);
    let limit = match (max > 0 && open_now > max, vhost_max) {
        (true, _) => Some(max),
        (false, Some(m)) if vhost_now > m => Some(m),
        _ => None,
    };
    if let Some(limit) = limit {
        // (The slot is given back as it drops.)
        return Err(AmqpError::not_allowed(format!(
            "access to vhost '{}' refused for user '{user}': connection limit ({limit}) is reached",
            open.virtual_host
        ))
        .on(ConnectionOpen::CLASS_ID, ConnectionOpen::METHOD_ID));
    }
    let shared = Arc::new(ConnectionShared {
        id: broker.next_connection_id(),
        outbox: outbox.clone(),
        frame_max: AtomicU32::new(tune.frame_max),
        channel_max: match tune.channel_max {
            0 => config.channel_max,
            n => n.min(config.channel_max),
        },
        cancel_notify: cap("consumer_cancel_notify"),
        blocked_notify: cap("connection.blocked"),
        has_published: std::sync::atomic::AtomicBool::new(false),
        congested: parking_lot::Mutex::new(Vec::new()),
        user,
        metrics: broker.metrics.clone(),
        name: format!("{peer} -> {local}"),
        peer,
        local,
        auth_mechanism: start_ok.mechanism.to_string(),
        heartbeat: tune.heartbeat,
        vhost: vhost.name().to_owned(),
        tls: matches!(tls, Tls::Verified(_)),
        connected_at: crate::queue::now_ms(),
        channels: parking_lot::Mutex::new(HashMap::new()),
        force_close: tokio_util::sync::CancellationToken::new(),
        close_reason: parking_lot::Mutex::new(String::new()),
        recv_oct: std::sync::atomic::AtomicU64::new(0),
        recv_cnt: std::sync::atomic::AtomicU64::new(0),
        octet_rates: Default::default(),
        client_properties: compact_table(&start_ok.client_properties),
    });
    // Listed (management API) before the client hears open-ok: a client
    // that asks right after connecting finds itself. (Nothing awaits
    // between here and the return: `serve_io` removes it when it closes.)
    broker.live_connections.insert(shared.id, shared.clone());
    broker.metrics.connections_opened.inc();
    write_method(
        outbox,
        0,
        &Method::ConnectionOpenOk(ConnectionOpenOk {
            known_hosts: ShortStr::default(),
        }),
    );
    Ok(Some(Opened {
        shared,
        vhost,
        heartbeat: tune.heartbeat,
        slot,
    }))
}

/// A copy of `table` in an allocation of its own: decoded tables share the
/// frame's read buffer, which a long-lived copy would otherwise keep alive.
fn compact_table(table: &FieldTable) -> FieldTable {
    let mut buf = bytes::BytesMut::new();
    if table.encode(&mut buf).is_err() {
        return FieldTable::new();
    }
    FieldTable::decode(&buf.freeze()).map_or_else(|_| FieldTable::new(), |(t, _)| t)
}

/// User and password from a `start-ok` response. EXTERNAL takes the user from
/// the verified client certificate (and no password).
fn credentials(
    mechanism: &str,
    response: &[u8],
    identity: Option<&str>,
) -> Option<(String, String)> {
    match mechanism {
        "EXTERNAL" => identity.map(|id| (id.to_owned(), String::new())),
        "PLAIN" => {
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next()?;
            let user = std::str::from_utf8(parts.next()?).ok()?;
            let pass = std::str::from_utf8(parts.next()?).ok()?;
            Some((user.to_owned(), pass.to_owned()))
        }
        "AMQPLAIN" => {
            let len = u32::try_from(response.len()).ok()?;
            let mut buf = BytesMut::with_capacity(response.len() + 4);
            buf.put_u32(len);
            buf.put_slice(response);
            let (table, _) = FieldTable::decode(&buf.freeze()).ok()?;
            let user = table.get("LOGIN")?.as_str()?.to_owned();
            let pass = table.get("PASSWORD")?.as_str()?.to_owned();
            Some((user, pass))
        }
        _ => None,
    }
}

/// A channel handling a command that waits for a commit; it yields the
/// channel back with the outcome.
type ChannelWait =
    Pin<Box<dyn Future<Output = (u16, Channel, Result<ChannelOutcome, AmqpError>)> + Send>>;

/// Octets of frames held for waiting channels beyond which the socket is
/// not read until a wait completes.
const HELD_FRAMES_LIMIT: usize = 1 << 20;

struct Connection {
    broker: Arc<Broker>,
    vhost: Arc<Vhost>,
    shared: Arc<ConnectionShared>,
    channels: rustc_hash::FxHashMap<u16, Channel>,
    /// Channels out of `channels` while a command waits for its commit, with
    /// the frames that arrived for them since, in order.
    waiting: rustc_hash::FxHashMap<u16, VecDeque<Frame>>,
    /// The waits in flight (polled by the read loop).
    in_flight: FuturesUnordered<ChannelWait>,
    /// Octets held in `waiting`.
    held: usize,
    heartbeat: u16,
    /// The client closed the connection (its `connection.close` was answered).
    client_closed: bool,
    /// Its place among the open connections (given back on drop).
    _slot: ConnectionSlot,
    partial: PartialBodies,
}

/// How far [`Connection::process_now`] got through the read buffer.
#[derive(Debug)]
enum Processed {
    /// Every complete frame was handled.
    All,
    /// A resource alarm stopped it at a frame boundary: the frames after it
    /// stay in the buffer until the connection may go on.
    Stopped,
    /// The close handshake completed: the connection ends.
    Closed,
    /// A command whose handler waits (consume, get, ...): handled by
    /// [`Connection::handle_waiting`] before the next frames.
    Waits(u16, Box<amqp_codec::Command>),
}

/// Body octets of this connection's messages still arriving, as accounted
/// in the broker's alarms (given back when the connection ends, however it
/// ends).
#[derive(Debug)]
struct PartialBodies {
    broker: Arc<Broker>,
    id: u64,
    held: u64,
}

impl PartialBodies {
    /// Accounts the channels' current partial bodies.
    fn update(&mut self, now: u64) {
        if now != self.held {
            let delta = now as i64 - self.held as i64;
            self.held = now;
            self.broker.alarms.note_partial_bodies(delta);
        }
        if now == 0 {
            self.broker.alarms.release_body_permit(self.id);
        }
    }
}

impl Drop for PartialBodies {
    fn drop(&mut self) {
        self.update(0);
    }
}

impl Connection {
    async fn run(&mut self, reader: &mut Reader) {
        let frame_max = self.shared.frame_max.load(Ordering::Relaxed);
        let hb = Duration::from_secs(u64::from(self.heartbeat.max(1)));
        let mut ticker = tokio::time::interval(hb / 2);
        let timeout_check = (self.broker.config.consumer_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut timeouts = tokio::time::interval(timeout_check);
        let mut alarms = self.broker.alarms.subscribe();
        let mut blocked = false;
        // Blocked, but allowed to finish the message body it is receiving.
        let mut finishing = false;
        let mut body_permit = self.broker.alarms.watch_body_permit();
        // Waiting for congested queues or the store (per-resource flow).
        let mut paused = false;
        let mut last_read = Instant::now();
        // Frames left in the buffer by an alarm (see `Processed::Stopped`).
        let mut stopped = false;
        loop {
            if stopped && (!blocked || finishing) && !paused {
                // The connection may go on: the frames already read first.
                stopped = false;
                if !self.take_frames(reader, frame_max, &mut stopped).await {
                    return;
                }
                (blocked, finishing, paused) = self.gates(blocked);
                continue;
            }
            reader.prepare();
            tokio::select! {
                _ = self.vhost.closed.cancelled() => {
                    let e = AmqpError::connection_forced(format!("vhost '{}' is deleted", self.vhost.name()));
                    self.close_with(reader, &e).await;
                    return;
                }
                _ = self.shared.force_close.cancelled() => {
                    let reason = self.shared.close_reason.lock().clone();
                    tracing::info!(connection = self.shared.id, %reason, "connection closed by an operator");
                    self.close_with(reader, &AmqpError::connection_forced(reason)).await;
                    return;
                }
                _ = self.broker.shutdown.cancelled() => {
                    let e = AmqpError::connection_forced("broker forced connection closure with reason 'shutdown'");
                    self.close_with(reader, &e).await;
                    return;
                }
                changed = alarms.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let state = *alarms.borrow_and_update();
                    blocked = self.update_blocked(blocked, state);
                    finishing = self.may_finish_body(blocked);
                }
                changed = body_permit.changed(), if blocked && !finishing && self.partial.held > 0 => {
                    if changed.is_err() {
                        return;
                    }
                    body_permit.borrow_and_update();
                    finishing = self.may_finish_body(blocked);
                }
                () = wait_lowered(self.congested_gates(paused)), if paused => {
                    paused = self.still_congested();
                }
                Some((id, ch, outcome)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    if let Err(e) = self.finish_wait(id, ch, outcome).await {
                        self.close_with(reader, &e).await;
                        return;
                    }
                    self.after_frames();
                    (blocked, finishing, paused) = self.gates(blocked);
                }
                read = reader.socket.read_buf(&mut reader.buf), if (!blocked || finishing) && !paused && !stopped && !self.shared.outbox.is_full() && self.held < HELD_FRAMES_LIMIT => {
                    match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            reader.note_read(n);
                            self.shared.recv_oct.fetch_add(n as u64, Ordering::Relaxed);
                            self.shared.recv_cnt.fetch_add(1, Ordering::Relaxed);
                            last_read = Instant::now();
                        }
                    }
                    if !self.take_frames(reader, frame_max, &mut stopped).await {
                        return;
                    }
                    (blocked, finishing, paused) = self.gates(blocked);
                }
                _ = ticker.tick(), if self.heartbeat > 0 => {
                    // A blocked publisher is not read, so its silence is ours.
                    if blocked || paused {
                        last_read = Instant::now();
                    }
                    if last_read.elapsed() > hb * 2 {
                        tracing::info!(connection = self.shared.id, "missed heartbeats from client, timeout: {}s", self.heartbeat);
                        return;
                    }
                    self.shared.outbox.write(encode_heartbeat);
                }
                _ = timeouts.tick() => {
                    // The queues may have drained under the watermark while
                    // bodies still arriving keep the alarm up: look again
                    // whether this one may be finished.
                    if blocked && !finishing && self.partial.held > 0 {
                        finishing = self.may_finish_body(blocked);
                    }
                    let now = crate::queue::now_ms();
                    for ch in self.channels.values_mut() {
                        if ch.is_closing() {
                            continue;
                        }
                        if let Err(e) = ch.check_consumer_timeout(&self.broker.node, &self.vhost, now) {
                            ch.fail(&self.broker.node, &self.vhost, &e);
                        }
                    }
                }
                _ = self.shared.outbox.drained() => {
                    last_read = Instant::now();
                    // Deliveries to this connection paused while its outbox was
                    // full; let its consumers' queues deliver again.
                    for ch in self.channels.values_mut() {
                        ch.redispatch(&self.vhost);
                    }
                }
            }
        }
    }

    /// Handles the frames buffered so far and what they leave behind
    /// ([`Connection::after_frames`]); sets `stopped` if an alarm stopped it
    /// at a frame boundary. `false`: the connection ends (closed, or closed
    /// for an error).
    async fn take_frames(
        &mut self,
        reader: &mut Reader,
        frame_max: u32,
        stopped: &mut bool,
    ) -> bool {
        loop {
            let processed = {
                // Deliveries and confirms this batch makes leave in one
                // write per connection when the cork drops (`outbox.rs`).
                let mut cork = Cork::new();
                let processed = self.process_now(reader, frame_max);
                if matches!(processed, Ok(Processed::All | Processed::Stopped)) {
                    self.after_frames();
                }
                // Read-complete: with nothing more from this peer for now,
                // the batch's frames go out at once; with more coming, the
                // writers take them (see `Cork::more_coming`).
                if cork.gathered() {
                    cork.more_coming(self.shared.outbox.peer_has_sent());
                }
                processed
            };
            match processed {
                Ok(Processed::All) => return true,
                Ok(Processed::Stopped) => {
                    *stopped = true;
                    return true;
                }
                Ok(Processed::Closed) => return false,
                Ok(Processed::Waits(channel, cmd)) => {
                    if let Err(e) = Box::pin(self.handle_waiting(channel, *cmd)).await {
                        self.close_with(reader, &e).await;
                        return false;
                    }
                }
                Err(e) => {
                    self.close_with(reader, &e).await;
                    return false;
                }
            }
        }
    }

    /// What may be read after a batch of frames: (blocked, finishing,
    /// paused). A publisher that just started publishing under an alarm
    /// stops, in the middle of a message if need be; so does one whose
    /// publishes hit a congested queue or store.
    fn gates(&mut self, was_blocked: bool) -> (bool, bool, bool) {
        let blocked = self.update_blocked(was_blocked, self.broker.alarms.current());
        let finishing = self.may_finish_body(blocked);
        (blocked, finishing, self.still_congested())
    }

    /// After a batch of frames: confirms go out, and bodies still arriving
    /// are accounted against the memory watermark.
    fn after_frames(&mut self) {
        for ch in self.channels.values_mut() {
            ch.flush_confirms(&self.broker.node);
        }
        let partial = self.channels.values().map(|c| c.assembler.buffered()).sum();
        self.partial.update(partial);
    }

    /// The gates to wait for while paused (none otherwise: no allocation on
    /// the read path).
    fn congested_gates(&self, paused: bool) -> Vec<Arc<FlowGate>> {
        if paused {
            self.shared.congested.lock().clone()
        } else {
            Vec::new()
        }
    }

    /// Forgets gates that were lowered; whether any is still raised.
    fn still_congested(&self) -> bool {
        let mut gates = self.shared.congested.lock();
        if gates.is_empty() {
            return false;
        }
        gates.retain(|g| g.is_raised());
        let paused = !gates.is_empty();
        tracing::trace!(
            connection = self.shared.id,
            paused,
            "publisher flow (queue or store)"
        );
        paused
    }

    /// Whether a blocked connection may go on reading to finish the message
    /// body it is receiving (see [`crate::alarm::Alarms::may_finish_body`]).
    fn may_finish_body(&self, blocked: bool) -> bool {
        if !blocked {
            self.broker.alarms.release_body_permit(self.shared.id);
            return false;
        }
        self.broker
            .alarms
            .may_finish_body(self.shared.id, self.partial.held)
    }

    /// Whether to stop reading: only publishers are blocked, and they are told
    /// (if they understand `connection.blocked`) when that changes.
    fn update_blocked(&self, was: bool, state: crate::alarm::AlarmState) -> bool {
        let now = state.any() && self.shared.has_published.load(Ordering::Relaxed);
        if now != was && self.shared.blocked_notify {
            let method = if now {
                Method::ConnectionBlocked(ConnectionBlocked {
                    reason: ShortStr::from_static(state.reason()),
                })
            } else {
                Method::ConnectionUnblocked(ConnectionUnblocked {})
            };
            write_method(&self.shared.outbox, 0, &method);
        }
        if now != was {
            tracing::info!(connection = self.shared.id, blocked = now, "publisher flow");
        }
        now
    }

    /// Handles the complete frames in the buffer, one at a time, until one
    /// is a command whose handler waits.
    ///
    /// As RabbitMQ's reader does, a publisher is blocked at the frame
    /// boundary once a resource alarm is raised: a publish arriving after
    /// the alarm stops at its content header and is not routed until the
    /// alarm clears (the frames behind it wait in the buffer). Only a body
    /// already arriving may be finished, under the body permit (see
    /// [`crate::alarm::Alarms::may_finish_body`]).
    fn process_now(&mut self, reader: &mut Reader, frame_max: u32) -> Result<Processed, AmqpError> {
        while let Some(frame) = decode_frame(&mut reader.buf, frame_max)? {
            // (RabbitMQ's reader blocks on a content frame, not on methods:
            // acks and the like already read still go through.)
            let content = matches!(frame, Frame::Header { .. } | Frame::Body { .. });
            match self.frame_now(frame)? {
                Step::Done => {}
                Step::Closed => return Ok(Processed::Closed),
                Step::Waits(channel, cmd) => return Ok(Processed::Waits(channel, cmd)),
            }
            if content
                && self.broker.alarms.any_raised()
                && !self
                    .broker
                    .alarms
                    .may_finish_body(self.shared.id, self.partial.held)
            {
                return Ok(Processed::Stopped);
            }
        }
        Ok(Processed::All)
    }

    /// Handles one frame as far as it can without waiting: every frame's
    /// path (a future made per frame, copied as it was made, cost S1 a
    /// tenth of its time), so it is not `async`. A command whose handler
    /// waits comes back as [`Step::Waits`].
    fn frame_now(&mut self, frame: Frame) -> Result<Step, AmqpError> {
        let channel = frame.channel();
        if channel == 0 {
            return Ok(if self.connection_frame(frame)? {
                Step::Closed
            } else {
                Step::Done
            });
        }
        // A message being received makes this a publisher now, not once the
        // message is complete: a large body must not escape an alarm.
        if matches!(frame, Frame::Header { .. } | Frame::Body { .. })
            && !self.shared.has_published.load(Ordering::Relaxed)
        {
            self.shared.has_published.store(true, Ordering::Relaxed);
        }
        // (No lookup unless some channel waits: this is every frame's path.)
        if !self.in_flight.is_empty() {
            if let Some(held) = self.waiting.get_mut(&channel) {
                self.held += held_size(&frame);
                held.push_back(frame);
                return Ok(Step::Done);
            }
        }
        let Some(ch) = self.channels.get_mut(&channel) else {
            return match frame {
                Frame::Method {
                    method: Method::ChannelOpen(_),
                    ..
                } => {
                    // As RabbitMQ 3.10 (against the spec's reading of
                    // channel_max as the highest channel number): any number
                    // may be opened, and the limit is on how many are open.
                    let max = self.shared.channel_max;
                    let open = self.channels.len() + self.waiting.len();
                    if max > 0 && open >= usize::from(max) {
                        return Err(AmqpError::not_allowed(format!(
                            "number of channels opened ({open}) has reached the negotiated channel_max ({max})"
                        )));
                    }
                    let ch = Channel::new(
                        channel,
                        self.shared.clone(),
                        self.broker.config.max_message_size,
                    );
                    ch.shared
                        .write_method(&Method::ChannelOpenOk(ChannelOpenOk {
                            channel_id: Bytes::new(),
                        }));
                    self.shared
                        .channels
                        .lock()
                        .insert(channel, Arc::downgrade(&ch.shared));
                    self.channels.insert(channel, ch);
                    self.broker.metrics.channel_opened();
                    Ok(Step::Done)
                }
                Frame::Method { method, .. } => {
                    Err(AmqpError::channel_error("expected 'channel.open'")
                        .on(method.class_id(), method.method_id()))
                }
                _ => Err(AmqpError::unexpected_frame(
                    "expected method frame, got non method frame instead",
                )),
            };
        };
        if ch.is_closing() {
            // Until close-ok only channel.close / close-ok matter; content of
            // publishes the client had in flight is dropped unassembled.
            let Frame::Method { method, .. } = frame else {
                return Ok(Step::Done);
            };
            let cmd = amqp_codec::Command {
                method,
                content: None,
            };
            let outcome = match ch.handle_now(&self.broker.node, &self.vhost, cmd) {
                Handled::Done(outcome) => outcome?,
                // (A closing channel waits for nothing.)
                Handled::Waits(_) => ChannelOutcome::Open,
            };
            match outcome {
                ChannelOutcome::Closed => {
                    if self.channels.remove(&channel).is_some() {
                        self.shared.channels.lock().remove(&channel);
                        self.broker.metrics.channel_closed();
                    }
                }
                ChannelOutcome::Open => {}
            }
            return Ok(Step::Done);
        }
        let before = ch.assembler.buffered();
        let pending = ch.assembler.pending_method_ids();
        let pushed = ch.assembler.push(frame);
        let after = ch.assembler.buffered();
        if before != after {
            // A completed body stops counting as arriving before it is
            // enqueued (and counted as queued): never both at once.
            let held = self.partial.held + after - before;
            self.partial.update(held);
        }
        let cmd = match pushed {
            Ok(Some(cmd)) => cmd,
            Ok(None) => return Ok(Step::Done),
            Err(e) => {
                // A frame out of order names the content method it
                // interrupted (RabbitMQ's class/method ids), 0/0 otherwise.
                let e = AmqpError::from(e);
                let e = match pending {
                    Some((class_id, method_id)) => e.on(class_id, method_id),
                    None => e,
                };
                return match e.scope {
                    Scope::Connection => Err(e),
                    Scope::Channel => {
                        ch.fail(&self.broker.node, &self.vhost, &e);
                        Ok(Step::Done)
                    }
                };
            }
        };
        self.handle_command(channel, cmd)
    }

    /// Hands a complete command to its channel; one that may wait for a
    /// commit is handled off the read loop (see the module comment), one
    /// whose handler waits otherwise comes back as [`Step::Waits`].
    fn handle_command(
        &mut self,
        channel: u16,
        cmd: amqp_codec::Command,
    ) -> Result<Step, AmqpError> {
        if may_wait(&cmd.method) {
            let Some(mut ch) = self.channels.remove(&channel) else {
                return Ok(Step::Done);
            };
            self.waiting.insert(channel, VecDeque::new());
            let (broker, vhost) = (self.broker.clone(), self.vhost.clone());
            self.in_flight.push(Box::pin(async move {
                let outcome = ch.handle(&broker.node, &vhost, cmd).await;
                (channel, ch, outcome)
            }));
            return Ok(Step::Done);
        }
        let Some(ch) = self.channels.get_mut(&channel) else {
            return Ok(Step::Done);
        };
        match ch.handle_now(&self.broker.node, &self.vhost, cmd) {
            Handled::Done(outcome) => {
                self.settle_outcome(channel, outcome)?;
                Ok(Step::Done)
            }
            Handled::Waits(cmd) => Ok(Step::Waits(channel, Box::new(cmd))),
        }
    }

    /// A command whose handler waits (consume, get, ...), on the read loop.
    async fn handle_waiting(
        &mut self,
        channel: u16,
        cmd: amqp_codec::Command,
    ) -> Result<(), AmqpError> {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return Ok(());
        };
        let outcome = ch.handle_waiting(&self.broker.node, &self.vhost, cmd).await;
        self.settle_outcome(channel, outcome)
    }

    /// A waiting channel is back: its outcome is settled and the frames
    /// held for it are handled in order (until it waits again).
    async fn finish_wait(
        &mut self,
        channel: u16,
        ch: Channel,
        outcome: Result<ChannelOutcome, AmqpError>,
    ) -> Result<(), AmqpError> {
        let held = self.waiting.remove(&channel).unwrap_or_default();
        self.channels.insert(channel, ch);
        self.settle_outcome(channel, outcome)?;
        for frame in held {
            self.held -= held_size(&frame);
            // (`frame_now` holds it again, in order, if it waits anew.)
            match self.frame_now(frame)? {
                Step::Done | Step::Closed => {}
                Step::Waits(channel, cmd) => Box::pin(self.handle_waiting(channel, *cmd)).await?,
            }
        }
        Ok(())
    }

    /// Waits for every channel still waiting and takes it back.
    async fn finish_waits(&mut self) {
        while let Some((channel, ch, outcome)) = self.in_flight.next().await {
            self.waiting.remove(&channel);
            self.channels.insert(channel, ch);
            let _ = self.settle_outcome(channel, outcome);
        }
        self.held = 0;
    }

    /// What a command's outcome does to its channel.
    fn settle_outcome(
        &mut self,
        channel: u16,
        outcome: Result<ChannelOutcome, AmqpError>,
    ) -> Result<(), AmqpError> {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return Ok(());
        };
        match outcome {
            Ok(ChannelOutcome::Open) => {}
            Ok(ChannelOutcome::Closed) => {
                if self.channels.remove(&channel).is_some() {
                    self.shared.channels.lock().remove(&channel);
                    self.broker.metrics.channel_closed();
                }
            }
            Err(e) if e.scope == Scope::Channel => ch.fail(&self.broker.node, &self.vhost, &e),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    fn connection_frame(&mut self, frame: Frame) -> Result<bool, AmqpError> {
        match frame {
            Frame::Heartbeat => Ok(false),
            Frame::Method {
                method: Method::ConnectionClose(_),
                ..
            } => {
                write_method(
                    &self.shared.outbox,
                    0,
                    &Method::ConnectionCloseOk(ConnectionCloseOk {}),
                );
                self.client_closed = true;
                Ok(true)
            }
            Frame::Method {
                method: Method::ConnectionCloseOk(_),
                ..
            } => Ok(true),
            Frame::Method {
                method: Method::ConnectionUpdateSecret(_),
                ..
            } => {
                write_method(
                    &self.shared.outbox,
                    0,
                    &Method::ConnectionUpdateSecretOk(ConnectionUpdateSecretOk {}),
                );
                Ok(false)
            }
            Frame::Method {
                method: Method::ConnectionBlocked(_) | Method::ConnectionUnblocked(_),
                ..
            } => Ok(false),
            Frame::Method { method, .. } => Err(AmqpError::channel_error(
                "unexpected method in connection state running",
            )
            .on(method.class_id(), method.method_id())),
            Frame::Header { .. } | Frame::Body { .. } => {
                Err(AmqpError::unexpected_frame("content frame on channel 0"))
            }
        }
    }

    /// Sends `connection.close` and waits (briefly) for `close-ok`.
    async fn close_with(&mut self, reader: &mut Reader, e: &AmqpError) {
        tracing::info!(connection = self.shared.id, error = %e, "closing connection");
        write_method(&self.shared.outbox, 0, &close_method(e));
        let wait = async {
            loop {
                match reader
                    .frame(self.shared.frame_max.load(Ordering::Relaxed))
                    .await
                {
                    Ok(Some(Frame::Method {
                        channel: 0,
                        method: Method::ConnectionCloseOk(_),
                    })) => return,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
    }

    /// Releases channels (requeueing unacked messages) and deletes this
    /// connection's exclusive queues.
    async fn cleanup(&mut self) {
        self.finish_waits().await;
        self.shared.channels.lock().clear();
        for (_, mut ch) in self.channels.drain() {
            self.broker.metrics.channel_closed();
            ch.release(&self.broker.node, &self.vhost);
        }
        for q in self.vhost.queues() {
            if q.exclusive_owner == Some(self.shared.id) {
                let _ = self.vhost.delete_queue(&q, false).await;
            }
        }
    }
}

/// Whether a command may wait for a commit (the store's today, a replicated
/// log's in a cluster): durable declares, binds, unbinds and deletes, and
/// `tx.commit`. Passive and transient ones complete at once on the same path.
/// What a frame came to without waiting ([`Connection::frame_now`]).
enum Step {
    Done,
    /// The connection closed.
    Closed,
    /// A command whose handler waits, for [`Connection::handle_waiting`].
    Waits(u16, Box<amqp_codec::Command>),
}

fn may_wait(method: &Method) -> bool {
    match method {
        Method::ExchangeDeclare(m) => m.durable && !m.passive,
        Method::QueueDeclare(m) => m.durable && !m.passive,
        Method::ExchangeDelete(_)
        | Method::ExchangeBind(_)
        | Method::ExchangeUnbind(_)
        | Method::QueueBind(_)
        | Method::QueueUnbind(_)
        | Method::QueueDelete(_)
        | Method::TxCommit(_) => true,
        _ => false,
    }
}

/// What a held frame counts against [`HELD_FRAMES_LIMIT`].
fn held_size(frame: &Frame) -> usize {
    match frame {
        Frame::Body { body, .. } => body.len() + 8,
        _ => 64,
    }
}

/// Resolves once every gate is lowered.
async fn wait_lowered(gates: Vec<Arc<FlowGate>>) {
    for g in gates {
        g.wait_lowered().await;
    }
}
