//! `warren-perf`: a load generator for any AMQP 0-9-1 broker, in the spirit of
//! RabbitMQ PerfTest. Producers and consumers speak the protocol through
//! `amqp-codec` directly: publishes are encoded in batches into one buffer and
//! written with one syscall, deliveries are parsed in place without per-message
//! allocation, so the tool is not the bottleneck a general-purpose client is.
//!
//! Each message body starts with its send time (ns since the Unix epoch), from
//! which consumers compute end-to-end latency. Progress goes to stderr once a
//! second; the last line on stdout is a JSON summary for scripts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amqp_codec::methods::*;
use amqp_codec::{
    BasicProperties, ContentHeader, FieldTable, Frame, Method, PROTOCOL_HEADER, ShortStr,
    decode_frame, encode_body, encode_content_header, encode_method,
};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Load generator for AMQP 0-9-1 brokers.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
struct Args {
    /// Broker URI.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    uri: String,
    /// Consumers connect here instead (another node of a cluster).
    #[arg(long)]
    consumer_uri: Option<String>,
    /// Queues are declared (and purged) here instead: in a cluster, the
    /// node they live on.
    #[arg(long)]
    declare_uri: Option<String>,
    /// Durable queues even without `--persistent` (a cluster replicates
    /// only durable queues so far).
    #[arg(long)]
    durable: bool,
    /// Producers (one connection each).
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Consumers (one connection each).
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// Queues. Producers and consumers are spread over them round-robin;
    /// with more queues than producers (consumers), each takes several,
    /// publishing to them in turn (consuming from each).
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Queue name prefix.
    #[arg(long, default_value = "perf")]
    queue: String,
    /// Message body size in octets (at least 8: the timestamp).
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Messages per second per producer (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Publisher confirms with at most this many outstanding (0 = no confirms).
    #[arg(long, default_value_t = 0)]
    confirm: u64,
    /// Persistent messages to durable queues.
    #[arg(long)]
    persistent: bool,
    /// Manual acks (instead of auto-ack) with this prefetch.
    #[arg(long, default_value_t = 0)]
    prefetch: u16,
    /// With manual acks, ack every N messages (multiple=true).
    #[arg(long, default_value_t = 1)]
    multi_ack_every: u64,
    /// Publishes per write in unconfirmed mode.
    #[arg(long, default_value_t = 64)]
    batch: u64,
    /// Publish to this exchange (declared with `--exchange-type`, every queue
    /// bound to it with its own name as key) instead of the default exchange.
    #[arg(long, default_value = "")]
    exchange: String,
    /// Type of `--exchange`: direct, fanout or topic.
    #[arg(long, default_value = "direct")]
    exchange_type: String,
    /// Do not purge the queues first (to drain a backlog built by an earlier run).
    #[arg(long)]
    no_purge: bool,
    /// Consumers stop once nothing arrived for a second: drain a backlog and
    /// report the rate up to the last message.
    #[arg(long)]
    drain: bool,
    /// Idle connections (one channel each) held open for the duration.
    #[arg(long, default_value_t = 0)]
    idle_connections: usize,
    /// `x-queue-type` of the queues declared (`quorum`: durable, replicated
    /// in a cluster); none by default.
    #[arg(long)]
    queue_type: Option<String>,
    /// Sample the latency of one message in N (default: every message with
    /// a `--rate` of at most 20,000 per producer; one in 16 otherwise).
    #[arg(long)]
    latency_every: Option<u64>,
    /// Print to stderr every sampled message slower than this many
    /// microseconds, with the wall-clock time it was published at (to line
    /// up a stall with the broker's log or a profile); 0 = none.
    #[arg(long, default_value_t = 0)]
    slow_us: u64,
}

#[derive(Debug, Default)]
struct Stats {
    published: AtomicU64,
    confirmed: AtomicU64,
    consumed: AtomicU64,
    /// Wall-clock time (ns since the epoch) of the last delivery seen.
    last_delivery_ns: AtomicU64,
    /// Idle connections opened.
    idle_open: AtomicU64,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Uri {
    addr: String,
    user: String,
    pass: String,
    vhost: String,
}

fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_uri(uri: &str) -> Result<Uri, Error> {
    let rest = uri
        .strip_prefix("amqp://")
        .ok_or("URI must start with amqp://")?;
    let (auth, rest) = rest.split_once('@').unwrap_or(("guest:guest", rest));
    let (user, pass) = auth.split_once(':').unwrap_or((auth, ""));
    let (hostport, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let addr = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5672")
    };
    let vhost = if vhost.is_empty() {
        "/".to_owned()
    } else {
        percent_decode(vhost)
    };
    Ok(Uri {
        addr,
        user: percent_decode(user),
        pass: percent_decode(pass),
        vhost,
    })
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn s(v: &str) -> ShortStr {
    ShortStr::try_from(v).unwrap_or_default()
}

/// A connection with channel 1 open.
struct Client {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    buf: BytesMut,
    frame_max: u32,
}

impl Client {
    async fn connect(uri: &Uri) -> Result<Client, Error> {
        let socket = TcpStream::connect(&uri.addr).await?;
        socket.set_nodelay(true)?;
        let (reader, writer) = socket.into_split();
        let mut c = Client {
            reader,
            writer,
            buf: BytesMut::with_capacity(1 << 20),
            frame_max: 131_072,
        };
        c.writer.write_all(&PROTOCOL_HEADER).await?;
        let Method::ConnectionStart(_) = c.method().await? else {
            return Err("expected connection.start".into());
        };
        let response = Bytes::from(format!("\0{}\0{}", uri.user, uri.pass));
        c.send(
            0,
            ConnectionStartOk {
                client_properties: FieldTable::new(),
                mechanism: s("PLAIN"),
                response,
                locale: s("en_US"),
            }
            .into(),
        )
        .await?;
        let Method::ConnectionTune(tune) = c.method().await? else {
            return Err("expected connection.tune".into());
        };
        c.frame_max = if tune.frame_max == 0 {
            131_072
        } else {
            tune.frame_max
        };
        c.send(
            0,
            ConnectionTuneOk {
                channel_max: 1,
                frame_max: c.frame_max,
                heartbeat: 0,
            }
            .into(),
        )
        .await?;
        c.send(
            0,
            ConnectionOpen {
                virtual_host: s(&uri.vhost),
                ..Default::default()
            }
            .into(),
        )
        .await?;
        let Method::ConnectionOpenOk(_) = c.method().await? else {
            return Err("expected connection.open-ok".into());
        };
        c.send(1, ChannelOpen::default().into()).await?;
        let Method::ChannelOpenOk(_) = c.method().await? else {
            return Err("expected channel.open-ok".into());
        };
        Ok(c)
    }

    async fn send(&mut self, channel: u16, method: Method) -> Result<(), Error> {
        let mut buf = BytesMut::new();
        encode_method(&mut buf, channel, &method)?;
        self.writer.write_all(&buf).await?;
        Ok(())
    }

    async fn frame(&mut self) -> Result<Frame, Error> {
        loop {
            if let Some(f) = decode_frame(&mut self.buf, 0)? {
                return Ok(f);
            }
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                return Err("broker closed the connection".into());
            }
        }
    }

    async fn method(&mut self) -> Result<Method, Error> {
        loop {
            match self.frame().await? {
                Frame::Method {
                    method: Method::ConnectionClose(c),
                    ..
                } => {
                    return Err(
                        format!("connection closed: {} {}", c.reply_code, c.reply_text).into(),
                    );
                }
                Frame::Method {
                    method: Method::ChannelClose(c),
                    ..
                } => {
                    return Err(format!("channel closed: {} {}", c.reply_code, c.reply_text).into());
                }
                Frame::Method { method, .. } => return Ok(method),
                _ => {}
            }
        }
    }
}

/// Waits (up to 10 s) until every queue is known at `uri` (a passive
/// declare succeeds): in a cluster, the consumers' node learns of queues
/// declared on another node a moment later.
async fn wait_visible(uri: &Uri, args: &Args) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for q in 0..args.queues {
        loop {
            let mut c = Client::connect(uri).await?;
            let passive = QueueDeclare {
                queue: s(&format!("{}-{q}", args.queue)),
                passive: true,
                ..Default::default()
            };
            c.send(1, passive.into()).await?;
            if let Ok(Method::QueueDeclareOk(_)) = c.method().await {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "queue {}-{q} not visible at the consumers' node",
                    args.queue
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// The queues' declare arguments.
fn queue_arguments(args: &Args) -> amqp_codec::FieldTable {
    let mut t = amqp_codec::FieldTable::default();
    if let Some(kind) = &args.queue_type {
        t.insert(
            s("x-queue-type"),
            amqp_codec::FieldValue::LongStr(bytes::Bytes::copy_from_slice(kind.as_bytes())),
        );
    }
    t
}

async fn declare(uri: &Uri, args: &Args) -> Result<(), Error> {
    let mut c = Client::connect(uri).await?;
    for q in 0..args.queues {
        c.send(
            1,
            QueueDeclare {
                queue: s(&format!("{}-{q}", args.queue)),
                durable: args.persistent || args.durable || args.queue_type.is_some(),
                arguments: queue_arguments(args),
                ..Default::default()
            }
            .into(),
        )
        .await?;
        let Method::QueueDeclareOk(_) = c.method().await? else {
            return Err("expected queue.declare-ok".into());
        };
        if !args.no_purge {
            c.send(
                1,
                QueuePurge {
                    queue: s(&format!("{}-{q}", args.queue)),
                    ..Default::default()
                }
                .into(),
            )
            .await?;
            let Method::QueuePurgeOk(_) = c.method().await? else {
                return Err("expected queue.purge-ok".into());
            };
        }
        if !args.exchange.is_empty() {
            if q == 0 {
                c.send(
                    1,
                    ExchangeDeclare {
                        exchange: s(&args.exchange),
                        kind: s(&args.exchange_type),
                        durable: args.persistent,
                        ..Default::default()
                    }
                    .into(),
                )
                .await?;
                let Method::ExchangeDeclareOk(_) = c.method().await? else {
                    return Err("expected exchange.declare-ok".into());
                };
            }
            let name = format!("{}-{q}", args.queue);
            c.send(
                1,
                QueueBind {
                    queue: s(&name),
                    exchange: s(&args.exchange),
                    routing_key: s(&name),
                    ..Default::default()
                }
                .into(),
            )
            .await?;
            let Method::QueueBindOk(_) = c.method().await? else {
                return Err("expected queue.bind-ok".into());
            };
        }
    }
    Ok(())
}

async fn produce(
    uri: Arc<Uri>,
    args: Arc<Args>,
    queues: Vec<String>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) -> Result<(), Error> {
    let mut c = Client::connect(&uri).await?;
    let confirms = args.confirm > 0;
    if confirms {
        c.send(1, ConfirmSelect::default().into()).await?;
        let Method::ConfirmSelectOk(_) = c.method().await? else {
            return Err("expected confirm.select-ok".into());
        };
    }
    // One publish per queue, taken in turn.
    let publishes: Vec<Method> = queues
        .iter()
        .map(|queue| {
            BasicPublish {
                exchange: s(&args.exchange),
                routing_key: s(queue),
                ..Default::default()
            }
            .into()
        })
        .collect();
    let header = ContentHeader {
        class_id: 60,
        weight: 0,
        body_size: args.size as u64,
        properties: BasicProperties {
            delivery_mode: Some(if args.persistent { 2 } else { 1 }),
            ..Default::default()
        }
        .to_raw()?,
    };
    let mut body = vec![0u8; args.size.max(8)];
    let Client {
        mut reader,
        mut writer,
        mut buf,
        frame_max,
    } = c;
    // Confirms arrive on the read half: a task tracks the highest confirmed tag.
    let confirmed = Arc::new(AtomicU64::new(0));
    let notify = Arc::new(tokio::sync::Notify::new());
    if confirms {
        let (confirmed, notify, stats) = (confirmed.clone(), notify.clone(), stats.clone());
        tokio::spawn(async move {
            loop {
                while let Ok(Some(f)) = decode_frame(&mut buf, 0) {
                    if let Frame::Method {
                        method:
                            Method::BasicAck(BasicAck { delivery_tag, .. })
                            | Method::BasicNack(BasicNack { delivery_tag, .. }),
                        ..
                    } = f
                    {
                        let before = confirmed.swap(delivery_tag, Ordering::AcqRel);
                        stats
                            .confirmed
                            .fetch_add(delivery_tag.saturating_sub(before), Ordering::Relaxed);
                        notify.notify_one();
                    }
                }
                match reader.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
    }
    let batch = if confirms {
        args.confirm.clamp(1, args.batch.max(1))
    } else {
        args.batch.max(1)
    };
    let mut out = BytesMut::with_capacity((batch as usize) * (args.size + 128));
    let mut sent: u64 = 0;
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // With a rate: the messages due by now (those a late timer owes
        // go in one write), at least one, at most a batch.
        let mut n = batch;
        if args.rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / args.rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            let owed = (start.elapsed().as_secs_f64() * args.rate as f64) as u64;
            n = owed.saturating_sub(sent).clamp(1, batch);
        }
        if confirms {
            while sent - confirmed.load(Ordering::Acquire) + batch > args.confirm {
                notify.notified().await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
        out.clear();
        for i in 0..n {
            body[..8].copy_from_slice(&now_ns().to_be_bytes());
            let publish = &publishes[((sent + i) % publishes.len() as u64) as usize];
            encode_method(&mut out, 1, publish)?;
            encode_content_header(&mut out, 1, &header)?;
            encode_body(&mut out, 1, &body[..args.size.max(8)], frame_max)?;
        }
        writer.write_all(&out).await?;
        sent += n;
        stats.published.fetch_add(n, Ordering::Relaxed);
    }
    Ok(())
}

async fn consume(
    uri: Arc<Uri>,
    args: Arc<Args>,
    queues: Vec<String>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    latencies: Arc<std::sync::Mutex<Vec<u64>>>,
) -> Result<(), Error> {
    let mut c = Client::connect(&uri).await?;
    let manual = args.prefetch > 0;
    if manual {
        c.send(
            1,
            BasicQos {
                prefetch_count: args.prefetch,
                ..Default::default()
            }
            .into(),
        )
        .await?;
        let Method::BasicQosOk(_) = c.method().await? else {
            return Err("expected basic.qos-ok".into());
        };
    }
    // One consumer per queue, all on channel 1. The first consume-ok is
    // awaited; the others are not (deliveries from the first queue may
    // come before them): the loop below skips them, and a refusal closes
    // the channel, which it reports.
    for (i, queue) in queues.iter().enumerate() {
        c.send(
            1,
            BasicConsume {
                queue: s(queue),
                no_ack: !manual,
                ..Default::default()
            }
            .into(),
        )
        .await?;
        if i == 0 {
            let Method::BasicConsumeOk(_) = c.method().await? else {
                return Err("expected basic.consume-ok".into());
            };
        }
    }
    let mut samples = Vec::with_capacity(1 << 16);
    // The tag of the delivery whose body is awaited, and of the last one
    // received whole (what an ack may cover: a read can end between a
    // basic.deliver and its body, and acking the tag twice is a 406).
    let mut delivering = 0u64;
    let mut last_tag = 0u64;
    let mut unacked = 0u64;
    let mut ack_buf = BytesMut::new();
    let mut n: u64 = 0;
    let mut quiet = 0;
    let every = args
        .latency_every
        .unwrap_or(if args.rate > 0 && args.rate <= 20_000 {
            1
        } else {
            16
        })
        .max(1);
    let slow_ns = args.slow_us.saturating_mul(1000);
    // Frames that arrived with basic.consume-ok are in the buffer
    // already: decoded before the first read.
    loop {
        let mut got = 0;
        while let Some(f) = decode_frame(&mut c.buf, 0)? {
            match f {
                Frame::Method {
                    method: Method::BasicDeliver(d),
                    ..
                } => delivering = d.delivery_tag,
                Frame::Method {
                    method: Method::ChannelClose(c),
                    ..
                } => {
                    return Err(format!("channel closed: {} {}", c.reply_code, c.reply_text).into());
                }
                Frame::Method {
                    method: Method::ConnectionClose(c),
                    ..
                } => {
                    return Err(
                        format!("connection closed: {} {}", c.reply_code, c.reply_text).into(),
                    );
                }
                Frame::Body { body, .. } => {
                    last_tag = delivering;
                    got += 1;
                    n += 1;
                    if n % every == 0 {
                        if let Some(ts) = body.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                            let sent = u64::from_be_bytes(ts);
                            let took = now_ns().saturating_sub(sent);
                            if slow_ns > 0 && took >= slow_ns {
                                eprintln!(
                                    "slow: {} us, published at {}.{:06}",
                                    took / 1000,
                                    sent / 1_000_000_000,
                                    sent % 1_000_000_000 / 1000
                                );
                            }
                            samples.push(took);
                        }
                    }
                    unacked += 1;
                }
                _ => {}
            }
        }
        stats.consumed.fetch_add(got, Ordering::Relaxed);
        if got > 0 {
            stats
                .last_delivery_ns
                .fetch_max(now_ns(), Ordering::Relaxed);
        }
        if manual && unacked >= args.multi_ack_every.max(1) {
            ack_buf.clear();
            encode_method(
                &mut ack_buf,
                1,
                &BasicAck {
                    delivery_tag: last_tag,
                    multiple: true,
                }
                .into(),
            )?;
            c.writer.write_all(&ack_buf).await?;
            unacked = 0;
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let read =
            tokio::time::timeout(Duration::from_millis(200), c.reader.read_buf(&mut c.buf)).await;
        match read {
            Err(_) if args.drain && n > 0 => {
                quiet += 1;
                if quiet >= 5 {
                    break;
                }
                continue;
            }
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => quiet = 0,
        }
    }
    if let Ok(mut l) = latencies.lock() {
        l.extend(samples);
    }
    Ok(())
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Arc::new(Args::parse());
    // A consumer that acks only every N messages with fewer than N
    // allowed unacknowledged would wait for ever.
    if args.prefetch > 0 && args.multi_ack_every > u64::from(args.prefetch) {
        return Err(format!(
            "--multi-ack-every {} is above --prefetch {}: the consumer would stop before its first ack",
            args.multi_ack_every, args.prefetch
        )
        .into());
    }
    let uri = Arc::new(parse_uri(&args.uri)?);
    let consumer_uri = match &args.consumer_uri {
        Some(u) => Arc::new(parse_uri(u)?),
        None => uri.clone(),
    };
    match &args.declare_uri {
        Some(u) => declare(&parse_uri(u)?, &args).await?,
        None => declare(&uri, &args).await?,
    }
    if args.declare_uri.is_some() || args.consumer_uri.is_some() {
        wait_visible(&consumer_uri, &args).await?;
        wait_visible(&uri, &args).await?;
    }
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Task i of n takes queue i % queues, or, with more queues than
    // tasks, every queue j with j % n == i (published to in turn).
    let queues_of = |i: usize, n: usize| -> Vec<String> {
        let queues = args.queues.max(1);
        if queues <= n {
            vec![format!("{}-{}", args.queue, i % queues)]
        } else {
            (0..queues)
                .filter(|j| j % n == i)
                .map(|j| format!("{}-{j}", args.queue))
                .collect()
        }
    };
    let mut tasks = Vec::new();
    for i in 0..args.consumers {
        tasks.push(tokio::spawn(consume(
            consumer_uri.clone(),
            args.clone(),
            queues_of(i, args.consumers),
            stats.clone(),
            stop.clone(),
            latencies.clone(),
        )));
    }
    for i in 0..args.producers {
        tasks.push(tokio::spawn(produce(
            uri.clone(),
            args.clone(),
            queues_of(i, args.producers),
            stats.clone(),
            stop.clone(),
        )));
    }
    if args.idle_connections > 0 {
        let (uri, stats, stop, n) = (
            uri.clone(),
            stats.clone(),
            stop.clone(),
            args.idle_connections,
        );
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::with_capacity(n);
            for _ in 0..n {
                held.push(Client::connect(&uri).await?);
                stats.idle_open.fetch_add(1, Ordering::Relaxed);
            }
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            drop(held);
            Ok(())
        }));
    }
    let start = Instant::now();
    let start_ns = now_ns();
    let (mut last_p, mut last_c) = (0, 0);
    for sec in 1..=args.duration {
        if args.drain && tasks.iter().all(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep_until((start + Duration::from_secs(sec)).into()).await;
        let (p, c) = (
            stats.published.load(Ordering::Relaxed),
            stats.consumed.load(Ordering::Relaxed),
        );
        eprintln!(
            "{sec:>4}s  published {:>9}/s  consumed {:>9}/s",
            p - last_p,
            c - last_c
        );
        (last_p, last_c) = (p, c);
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = if args.drain {
        // Up to the last message, not the quiet second that ended the drain.
        let last = stats.last_delivery_ns.load(Ordering::Relaxed);
        (last.saturating_sub(start_ns) as f64 / 1e9).max(1e-3)
    } else {
        start.elapsed().as_secs_f64()
    };
    for t in tasks {
        if let Ok(Err(e)) = t.await {
            eprintln!("task failed: {e}");
        }
    }
    let mut l = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_unstable();
    let us = |ns: u64| ns / 1000;
    println!(
        "{{\"published\":{},\"confirmed\":{},\"consumed\":{},\"seconds\":{:.2},\"publish_rate\":{:.0},\"consume_rate\":{:.0},\"idle_connections\":{},\"latency_us\":{{\"p50\":{},\"p95\":{},\"p99\":{},\"p999\":{},\"max\":{}}}}}",
        stats.published.load(Ordering::Relaxed),
        stats.confirmed.load(Ordering::Relaxed),
        stats.consumed.load(Ordering::Relaxed),
        elapsed,
        stats.published.load(Ordering::Relaxed) as f64 / elapsed,
        stats.consumed.load(Ordering::Relaxed) as f64 / elapsed,
        stats.idle_open.load(Ordering::Relaxed),
        us(percentile(&l, 0.5)),
        us(percentile(&l, 0.95)),
        us(percentile(&l, 0.99)),
        us(percentile(&l, 0.999)),
        us(l.last().copied().unwrap_or(0)),
    );
    Ok(())
}
