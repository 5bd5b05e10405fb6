//! [`Links`]: the authenticated TCP connections between nodes (the cluster
//! port, 25672 by default) and the requests that travel on them.
//!
//! One connection per node pair, used both ways: either side sends requests
//! and answers the other's, each request carrying an id its response echoes,
//! so many are in flight at once. If both nodes dial each other at the same
//! moment, the connection dialed by the smaller node id is kept.
//!
//! **Authentication** (the role of RabbitMQ's Erlang cookie): both nodes
//! hold the cluster secret (`--cluster-secret-file`) and never send it.
//! The dialer sends its identity and a random nonce; the acceptor answers
//! with its identity, its own nonce and an HMAC-SHA256 over both nonces and
//! both ids keyed with the secret; the dialer checks it and proves itself
//! the same way. Only then is anything acted upon. Every later frame
//! carries an HMAC (truncated to 16 octets) keyed with a session key derived
//! from both nonces, over a per-direction sequence number and the frame,
//! so nothing injected into or replayed on the stream is accepted; a bad
//! tag closes the connection. Frames are authenticated, not encrypted,
//! unless the cluster runs with TLS ([`LinkTls`], `--cluster-tls-*`): then
//! every connection is mutual TLS (both nodes present a certificate the
//! cluster's CA signed; the dialer checks the certificate names the host it
//! dialled) and the handshake above runs inside it, so a node still needs
//! the secret as well as a certificate.
//!
//! Frame: `len u32 | tag [16] | kind u8 | id u64 | payload (JSON)`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::FutureExt;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::identity::NodeInfo;
use crate::rpc::{Request, Response};

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 16] = b"WARREN-CLUSTER/1";
/// Largest frame accepted from a peer: the largest message a broker may
/// accept, with room for what travels with it (an enqueue, a delivery, a
/// Raft entry of a batch of messages). A peer's length is only a claim:
/// the read buffer grows as the octets arrive.
pub(crate) const MAX_FRAME: usize = server::config::MAX_MESSAGE_SIZE_LIMIT as usize + (16 << 20);
/// How much a link's read asks the socket for at a time.
const READ_CHUNK: usize = 64 << 10;
/// Largest handshake message (identities and nonces).
const MAX_HELLO: usize = 64 << 10;
const TAG_LEN: usize = 16;
const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;
/// A request that gets no response.
const KIND_ONEWAY: u8 = 3;
/// A request's or response's payload on the wire: bincode (bodies as raw
/// octets), within the frame limit.
fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    use bincode::Options as _;
    wire_options().serialize(value).map_err(|e| e.to_string())
}

fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, String> {
    use bincode::Options as _;
    wire_options()
        .deserialize(payload)
        .map_err(|e| e.to_string())
}

/// How many octets `value` takes on the wire, if it fits a frame.
pub(crate) fn encoded_len<T: Serialize>(value: &T) -> Option<u64> {
    use bincode::Options as _;
    wire_options().serialized_size(value).ok()
}

fn wire_options() -> impl bincode::Options {
    use bincode::Options as _;
    bincode::DefaultOptions::new().with_limit(MAX_FRAME as u64)
}

/// A frame sent after the connection has written nothing for this long is
/// written by its sender at once (the low-latency path); one sent sooner
/// after another waits, with whatever else comes, for the connection's
/// writer task (one write for many frames when the link is busy).
const WRITE_THROUGH_IDLE: Duration = Duration::from_micros(50);
/// Sent on a link idle for [`PING_INTERVAL`]; read and ignored.
const KIND_PING: u8 = 4;
/// An idle link sends a ping this often ...
pub const PING_INTERVAL: Duration = Duration::from_secs(1);
/// ... and a link that hears nothing for this long is closed: a peer cut
/// off without a reset (a partition, a blackhole) is gone within it, as a
/// dead one is (RabbitMQ's `net_ticktime`, much shorter).
pub const LINK_SILENCE: Duration = Duration::from_secs(5);

/// Why a request got no response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// The peer could not be reached or the connection dropped.
    #[error("node at {addr} unreachable: {reason}")]
    Unreachable {
        /// Where.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The peer refused us, or we it (secret, cluster name, forgotten).
    #[error("node at {addr} refused: {reason}")]
    Refused {
        /// Where.
        addr: String,
        /// Why.
        reason: String,
    },
    /// No response in time.
    #[error("no response from {0} in time")]
    Timeout(String),
}

/// Answers requests from peers.
pub trait RequestHandler: Send + Sync + 'static {
    /// The response to `request` from `from`.
    fn handle(
        &self,
        from: NodeInfo,
        request: Request,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>;

    /// Every request that arrived from `from` in one read of the link has
    /// been handled (called before the link waits for more): work the
    /// handler keeps for the end of a burst is done now.
    fn end_of_burst(&self, _from: &NodeInfo) {}

    /// Whether a node with this id may talk to us (a forgotten node may not).
    fn admits(&self, id: u64) -> Result<(), String>;

    /// The connection to node `id` closed (what it held here is released).
    fn peer_gone(&self, id: u64);
}

#[derive(Serialize, Deserialize)]
struct Hello {
    cluster: String,
    node: NodeInfo,
    nonce: [u8; 32],
}

#[derive(Serialize, Deserialize)]
enum Reply {
    Challenge {
        node: NodeInfo,
        nonce: [u8; 32],
        proof: Vec<u8>,
    },
    Refused(String),
}

#[derive(Serialize, Deserialize)]
enum Finish {
    Proof(Vec<u8>),
    Refused(String),
}

#[derive(Serialize, Deserialize)]
enum Verdict {
    Welcome,
    Refused(String),
}

fn proof(
    secret: &[u8],
    role: &str,
    cluster: &str,
    a: &Hello,
    b_id: u64,
    b_nonce: &[u8],
) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable_key());
    mac.update(MAGIC);
    mac.update(role.as_bytes());
    mac.update(cluster.as_bytes());
    mac.update(&a.nonce);
    mac.update(b_nonce);
    mac.update(&a.node.id.to_be_bytes());
    mac.update(&b_id.to_be_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// HMAC takes keys of any length; this is never reached.
fn unreachable_key() -> HmacSha256 {
    // An empty key is valid for HMAC as well.
    #[allow(clippy::expect_used)]
    HmacSha256::new_from_slice(&[0u8; 32]).expect("HMAC accepts any key length")
}

fn verify(expected: &[u8], got: &[u8]) -> bool {
    // Constant-time comparison through the MAC type.
    expected.len() == got.len()
        && expected
            .iter()
            .zip(got)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn write_msg<T: Serialize, S: AsyncWrite + Unpin>(s: &mut S, msg: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let mut out = BytesMut::with_capacity(4 + body.len());
    out.put_u32(body.len() as u32);
    out.put_slice(&body);
    s.write_all(&out).await
}

async fn read_msg<T: for<'de> Deserialize<'de>, S: AsyncRead + Unpin>(
    s: &mut S,
) -> std::io::Result<T> {
    let len = s.read_u32().await? as usize;
    if len > MAX_HELLO {
        return Err(std::io::Error::other(format!(
            "handshake message of {len} octets (at most {MAX_HELLO})"
        )));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(std::io::Error::other)
}

/// TLS for the links: every node presents its certificate and key and
/// accepts only peers whose certificate the cluster's CA signed.
#[derive(Clone)]
pub struct LinkTls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkTls")
    }
}

impl LinkTls {
    /// Mutual TLS (1.2 and 1.3) with this node's certificate chain `cert`
    /// and key `key` (PEM), trusting the CA certificates in `ca` (PEM) for
    /// peers both ways.
    pub fn new(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> Result<LinkTls, String> {
        use rustls_pki_types::PrivateKeyDer;
        use rustls_pki_types::pem::PemObject;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions = [&rustls::version::TLS12, &rustls::version::TLS13];
        let mut roots = rustls::RootCertStore::empty();
        for c in server::tls::load_certs(ca)? {
            roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        let roots = Arc::new(roots);
        let chain = server::tls::load_certs(cert)?;
        let private = |what: &str| {
            PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{what} {}: {e}", key.display()))
        };
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), private("key")?)
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private("key")?)
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        Ok(LinkTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        })
    }
}

/// The name a dialled address's certificate must carry: its host (a DNS
/// name or an IP address).
fn server_name(addr: &str) -> Result<rustls_pki_types::ServerName<'static>, String> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("'{host}' is not a host name for TLS: {e}"))
}

/// A link's byte stream: TCP, or TLS over it.
enum LinkStream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl AsyncRead for LinkStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            LinkStream::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            LinkStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for LinkStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            LinkStream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            LinkStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            LinkStream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            LinkStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            LinkStream::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            LinkStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A session's keys: one per direction.
struct Keys {
    send: HmacSha256,
    recv: HmacSha256,
}

fn session_keys(secret: &[u8], dialer_nonce: &[u8], acceptor_nonce: &[u8], dialer: bool) -> Keys {
    let derive = |label: &str| {
        let mut mac = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable_key());
        mac.update(MAGIC);
        mac.update(label.as_bytes());
        mac.update(dialer_nonce);
        mac.update(acceptor_nonce);
        let key = mac.finalize().into_bytes();
        HmacSha256::new_from_slice(&key).unwrap_or_else(|_| unreachable_key())
    };
    let (to_acceptor, to_dialer) = (derive("dialer->acceptor"), derive("acceptor->dialer"));
    if dialer {
        Keys {
            send: to_acceptor,
            recv: to_dialer,
        }
    } else {
        Keys {
            send: to_dialer,
            recv: to_acceptor,
        }
    }
}

fn frame_tag(key: &HmacSha256, seq: u64, body: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = key.clone();
    mac.update(&seq.to_be_bytes());
    mac.update(body);
    let full = mac.finalize().into_bytes();
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&full[..TAG_LEN]);
    tag
}

/// Requests sent on a connection and waiting for their answers: where the
/// answer goes, and the outbox backlog it counts against (if any).
type Pending = Arc<Mutex<HashMap<u64, Waiting>>>;

/// A request waiting for its answer.
struct Waiting {
    answer: oneshot::Sender<Result<Response, LinkError>>,
    backlog: Option<Arc<Backlog>>,
    /// An enqueue: if it failed and its caller no longer waits (a publish
    /// without confirms), the loss is logged here.
    enqueue: bool,
}

impl Waiting {
    fn answer(self, response: Result<Response, LinkError>) {
        if let Err(unheard) = self.answer.send(response) {
            let failure = match &unheard {
                Err(e) => Some(e.to_string()),
                Ok(Response::Enqueued(Err(e))) => Some(e.clone()),
                Ok(_) => None,
            };
            if let Some(e) = failure.filter(|_| self.enqueue) {
                tracing::warn!(error = %e, "a message for a queue on another node was lost");
            }
        }
        if let Some(b) = self.backlog {
            b.done();
        }
    }
}

/// A peer's outbox backlog: requests queued for it or waiting for its
/// answer. Over [`BACKLOG_HIGH`] its gate is raised (publishers whose
/// messages go there pause, as for a congested local queue); it is lowered
/// at [`BACKLOG_LOW`].
#[derive(Debug, Default)]
pub struct Backlog {
    count: AtomicU64,
    /// The gate publishers wait on.
    pub gate: Arc<queue_store::FlowGate>,
}

/// Requests to one peer in flight before its publishers pause ...
pub const BACKLOG_HIGH: u64 = 16_384;
/// ... and when they resume.
pub const BACKLOG_LOW: u64 = 8_192;

impl Backlog {
    fn add(&self) {
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 >= BACKLOG_HIGH {
            self.gate.raise();
        }
    }

    fn done(&self) {
        let before = self.count.fetch_sub(1, Ordering::AcqRel);
        if before <= BACKLOG_LOW && self.gate.is_raised() {
            self.gate.lower();
        }
    }
}

/// One live, authenticated connection.
struct Conn {
    peer: NodeInfo,
    /// Whether we dialed it.
    dialed: bool,
    out: Arc<Wire>,
    pending: Pending,
    closed: tokio_util::sync::CancellationToken,
}

/// The node's connections to its peers.
pub struct Links {
    me: NodeInfo,
    cluster: String,
    secret: Arc<[u8]>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    handler: std::sync::OnceLock<Arc<dyn RequestHandler>>,
    shutdown: tokio_util::sync::CancellationToken,
    /// Ordered senders, by peer address (see `send_ordered`), and their
    /// backlogs.
    outboxes: Mutex<HashMap<String, Arc<Outbox>>>,
    /// TLS for every connection, if the cluster uses it.
    tls: std::sync::OnceLock<LinkTls>,
}

/// A peer's outbox. While its connection is up and nothing waits in its
/// queue, a request goes straight onto the connection from the caller
/// (`direct`, one task hop fewer per message: this is the latency path);
/// otherwise it is queued for the outbox's task, which dials and sends in
/// order. Both paths send under `direct`'s lock, and the task counts what
/// it holds (`in_task`), so requests to one peer keep the order of calls.
struct Outbox {
    queue: mpsc::UnboundedSender<Queued>,
    backlog: Arc<Backlog>,
    /// Requests queued for the task and not yet on a connection.
    in_task: AtomicU64,
    /// The connection the task last sent on (its lock orders the paths).
    direct: Mutex<Option<Arc<Conn>>>,
}

/// A request waiting in a peer's outbox, and where its answer goes (none:
/// one-way).
type Queued = (
    Request,
    Option<oneshot::Sender<Result<Response, LinkError>>>,
);

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("me", &self.me)
            .field("peers", &self.conns.lock().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Links {
    /// Links for `me` in `cluster`, authenticated with `secret`.
    pub fn new(me: NodeInfo, cluster: String, secret: Arc<[u8]>) -> Arc<Links> {
        Arc::new(Links {
            me,
            cluster,
            secret,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            handler: std::sync::OnceLock::new(),
            shutdown: tokio_util::sync::CancellationToken::new(),
            outboxes: Mutex::new(HashMap::new()),
            tls: std::sync::OnceLock::new(),
        })
    }

    /// Who answers peers' requests (set once, before `serve`).
    pub fn set_handler(&self, handler: Arc<dyn RequestHandler>) {
        let _ = self.handler.set(handler);
    }

    /// Runs every connection (made or accepted from now on) over TLS.
    pub fn set_tls(&self, tls: LinkTls) {
        let _ = self.tls.set(tls);
    }

    /// This node.
    pub fn me(&self) -> &NodeInfo {
        &self.me
    }

    /// Ids of the nodes connected now.
    pub fn connected(&self) -> Vec<u64> {
        self.conns
            .lock()
            .iter()
            .filter(|(_, c)| !c.closed.is_cancelled())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Closes every connection and stops accepting.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
        for (_, c) in self.conns.lock().drain() {
            c.closed.cancel();
        }
    }

    /// Closes the connection to node `id` (a forgotten node).
    pub fn disconnect(&self, id: u64) {
        if let Some(c) = self.conns.lock().remove(&id) {
            c.closed.cancel();
        }
    }

    /// Accepts peers on `listener` until shutdown.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((socket, addr)) => {
                        let links = self.clone();
                        tokio::spawn(async move {
                            let handshake = tokio::time::timeout(Duration::from_secs(10), links.clone().accept(socket));
                            match handshake.await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => tracing::warn!(%addr, error = %e, "cluster connection refused"),
                                Err(_) => tracing::warn!(%addr, "cluster handshake timed out"),
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    async fn accept(self: Arc<Self>, s: TcpStream) -> Result<(), String> {
        let _ = s.set_nodelay(true);
        let mut s = match self.tls.get() {
            Some(tls) => LinkStream::Tls(Box::new(
                tls.acceptor
                    .accept(s)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?
                    .into(),
            )),
            None => LinkStream::Tcp(s),
        };
        let mut magic = [0u8; 16];
        s.read_exact(&mut magic).await.map_err(|e| e.to_string())?;
        if &magic != MAGIC {
            return Err("not a Warren cluster peer (bad protocol header)".into());
        }
        let hello: Hello = read_msg(&mut s).await.map_err(|e| e.to_string())?;
        let refusal = if hello.cluster != self.cluster {
            Some(format!(
                "cluster name '{}' is not this cluster's ('{}')",
                hello.cluster, self.cluster
            ))
        } else if hello.node.id == self.me.id {
            Some("it has this node's own id".to_owned())
        } else {
            None
        };
        if let Some(reason) = refusal {
            let _ = write_msg(&mut s, &Reply::Refused(reason.clone())).await;
            return Err(format!(
                "node '{}' ({}): {reason}",
                hello.node.name, hello.node.id
            ));
        }
        let nonce: [u8; 32] = rand::random();
        let mine = proof(
            &self.secret,
            "acceptor",
            &self.cluster,
            &hello,
            self.me.id,
            &nonce,
        );
        let reply = Reply::Challenge {
            node: self.me.clone(),
            nonce,
            proof: mine,
        };
        write_msg(&mut s, &reply).await.map_err(|e| e.to_string())?;
        let finish: Finish = read_msg(&mut s).await.map_err(|e| e.to_string())?;
        let theirs = match finish {
            Finish::Proof(p) => p,
            Finish::Refused(r) => return Err(format!("the dialer refused us: {r}")),
        };
        let expected = proof(
            &self.secret,
            "dialer",
            &self.cluster,
            &hello,
            self.me.id,
            &nonce,
        );
        if !verify(&expected, &theirs) {
            let _ = write_msg(
                &mut s,
                &Verdict::Refused("invalid challenge reply: the cluster secrets differ".into()),
            )
            .await;
            return Err(format!(
                "node '{}' at {} gave an invalid challenge reply: its cluster secret differs",
                hello.node.name, hello.node.cluster_addr
            ));
        }
        if let Some(handler) = self.handler.get() {
            if let Err(reason) = handler.admits(hello.node.id) {
                let _ = write_msg(&mut s, &Verdict::Refused(reason.clone())).await;
                return Err(reason);
            }
        }
        write_msg(&mut s, &Verdict::Welcome)
            .await
            .map_err(|e| e.to_string())?;
        let keys = session_keys(&self.secret, &hello.nonce, &nonce, false);
        tracing::info!(peer = %hello.node.name, id = hello.node.id, addr = %hello.node.cluster_addr, "cluster peer connected (inbound)");
        self.install(s, hello.node, false, keys);
        Ok(())
    }

    async fn dial(self: &Arc<Self>, addr: &str) -> Result<Arc<Conn>, LinkError> {
        let unreachable = |reason: String| LinkError::Unreachable {
            addr: addr.to_owned(),
            reason,
        };
        let refused = |reason: String| LinkError::Refused {
            addr: addr.to_owned(),
            reason,
        };
        let s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
            .await
            .map_err(|_| unreachable("connect timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = s.set_nodelay(true);
        let mut s = match self.tls.get() {
            Some(tls) => {
                let name = server_name(addr).map_err(refused)?;
                let tls =
                    tokio::time::timeout(Duration::from_secs(10), tls.connector.connect(name, s))
                        .await
                        .map_err(|_| unreachable("TLS handshake timed out".into()))?
                        .map_err(|e| refused(format!("TLS: {e}")))?;
                LinkStream::Tls(Box::new(tls.into()))
            }
            None => LinkStream::Tcp(s),
        };
        let hello = Hello {
            cluster: self.cluster.clone(),
            node: self.me.clone(),
            nonce: rand::random(),
        };
        let handshake = async {
            s.write_all(MAGIC)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            write_msg(&mut s, &hello)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let reply: Reply = read_msg(&mut s)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let (peer, nonce, theirs) = match reply {
                Reply::Challenge { node, nonce, proof } => (node, nonce, proof),
                Reply::Refused(r) => return Err(refused(r)),
            };
            let expected = proof(
                &self.secret,
                "acceptor",
                &self.cluster,
                &hello,
                peer.id,
                &nonce,
            );
            if !verify(&expected, &theirs) {
                let _ = write_msg(&mut s, &Finish::Refused("invalid challenge reply".into())).await;
                return Err(refused(format!(
                    "node '{}' gave an invalid challenge reply: its cluster secret differs",
                    peer.name
                )));
            }
            if let Some(handler) = self.handler.get() {
                if let Err(reason) = handler.admits(peer.id) {
                    let _ = write_msg(&mut s, &Finish::Refused(reason.clone())).await;
                    return Err(refused(reason));
                }
            }
            let mine = proof(
                &self.secret,
                "dialer",
                &self.cluster,
                &hello,
                peer.id,
                &nonce,
            );
            write_msg(&mut s, &Finish::Proof(mine))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            match read_msg::<Verdict, _>(&mut s).await {
                Ok(Verdict::Welcome) => Ok((peer, nonce)),
                Ok(Verdict::Refused(r)) => Err(refused(r)),
                Err(e) => Err(unreachable(e.to_string())),
            }
        };
        let (peer, nonce) = tokio::time::timeout(Duration::from_secs(10), handshake)
            .await
            .map_err(|_| unreachable("handshake timed out".into()))??;
        let keys = session_keys(&self.secret, &hello.nonce, &nonce, true);
        tracing::info!(peer = %peer.name, id = peer.id, %addr, "cluster peer connected (outbound)");
        Ok(self.install(s, peer, true, keys))
    }

    /// Registers a connection and starts its reader and writer.
    fn install(
        self: &Arc<Self>,
        s: LinkStream,
        peer: NodeInfo,
        dialed: bool,
        keys: Keys,
    ) -> Arc<Conn> {
        // Plain TCP: senders may write the socket themselves (see `Wire`).
        // TLS: its writer task writes every frame.
        type Reader = Box<dyn AsyncRead + Send + Unpin>;
        type Writer = Box<dyn AsyncWrite + Send + Unpin>;
        let (read, write, stream): (Reader, _, Option<Writer>) = match s {
            LinkStream::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Some(w), None)
            }
            LinkStream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (Box::new(r), None, Some(Box::new(w)))
            }
        };
        let Keys { send, recv } = keys;
        let out = Arc::new(Wire {
            state: Mutex::new(WireState {
                buf: BytesMut::new(),
                seq: 0,
                flushing: false,
                closed: false,
                last_write: std::time::Instant::now(),
            }),
            sock: write,
            key: send,
            wake: tokio::sync::Notify::new(),
        });
        let conn = Arc::new(Conn {
            peer: peer.clone(),
            dialed,
            out: out.clone(),
            pending: Arc::default(),
            closed: self.shutdown.child_token(),
        });
        {
            let mut conns = self.conns.lock();
            let keep_new = match conns.get(&peer.id) {
                Some(old) if !old.closed.is_cancelled() => {
                    // Both dialed at once: keep the one the smaller id dialed.
                    let dialer_of = |c: &Conn| if c.dialed { self.me.id } else { c.peer.id };
                    dialer_of(&conn) <= dialer_of(old)
                }
                _ => true,
            };
            if keep_new {
                if let Some(old) = conns.insert(peer.id, conn.clone()) {
                    old.closed.cancel();
                }
            }
        }
        tokio::spawn(write_loop(out, stream, conn.closed.clone()));
        tokio::spawn(read_loop(self.clone(), read, recv, conn.clone()));
        conn
    }

    /// The connection to `addr` (an existing one to `id`, or to a node at
    /// `addr`, if there is one).
    async fn conn(self: &Arc<Self>, id: Option<u64>, addr: &str) -> Result<Arc<Conn>, LinkError> {
        {
            let conns = self.conns.lock();
            let existing = match id {
                Some(id) => conns.get(&id),
                None => conns.values().find(|c| c.peer.cluster_addr == addr),
            };
            if let Some(c) = existing {
                if !c.closed.is_cancelled() {
                    return Ok(c.clone());
                }
            }
        }
        let c = self.dial(addr).await?;
        if let Some(id) = id {
            if c.peer.id != id {
                c.closed.cancel();
                return Err(LinkError::Refused {
                    addr: addr.to_owned(),
                    reason: format!(
                        "expected node {id}, found node {} ('{}')",
                        c.peer.id, c.peer.name
                    ),
                });
            }
        }
        Ok(c)
    }

    /// Queues `request` for the node at `addr`: requests queued for one
    /// node are sent in the order of these calls (and the receiving node
    /// handles each in that order before answering); the answer comes on
    /// the returned channel.
    pub fn send_ordered(
        self: &Arc<Self>,
        addr: &str,
        request: Request,
    ) -> oneshot::Receiver<Result<Response, LinkError>> {
        let (tx, rx) = oneshot::channel();
        self.queue_for(addr, request, Some(tx));
        rx
    }

    /// Queues a one-way `request` for the node at `addr`, in order with
    /// [`send_ordered`](Self::send_ordered)'s; no answer comes (if the link
    /// is down it is dropped).
    pub fn send_oneway(self: &Arc<Self>, addr: &str, request: Request) {
        self.queue_for(addr, request, None);
    }

    fn queue_for(
        self: &Arc<Self>,
        addr: &str,
        request: Request,
        tx: Option<oneshot::Sender<Result<Response, LinkError>>>,
    ) {
        let outbox = self.outbox(addr);
        outbox.backlog.add();
        let direct = outbox.direct.lock();
        if outbox.in_task.load(Ordering::Acquire) == 0 {
            if let Some(conn) = direct.as_ref().filter(|c| !c.closed.is_cancelled()) {
                self.send_on(conn, addr, request, tx, &outbox.backlog);
                return;
            }
        }
        outbox.in_task.fetch_add(1, Ordering::AcqRel);
        drop(direct);
        if let Err(mpsc::error::SendError((_, tx))) = outbox.queue.send((request, tx)) {
            outbox.in_task.fetch_sub(1, Ordering::AcqRel);
            outbox.backlog.done();
            if let Some(tx) = tx {
                let _ = tx.send(Err(LinkError::Unreachable {
                    addr: addr.to_owned(),
                    reason: "shutting down".into(),
                }));
            }
        }
    }

    /// The outbox for `addr` (its task started on first use).
    fn outbox(self: &Arc<Self>, addr: &str) -> Arc<Outbox> {
        let mut outboxes = self.outboxes.lock();
        if let Some(o) = outboxes.get(addr) {
            return o.clone();
        }
        let (out, queue) = mpsc::unbounded_channel();
        let outbox = Arc::new(Outbox {
            queue: out,
            backlog: Arc::new(Backlog::default()),
            in_task: AtomicU64::new(0),
            direct: Mutex::new(None),
        });
        outboxes.insert(addr.to_owned(), outbox.clone());
        tokio::spawn(
            self.clone()
                .drain_outbox(addr.to_owned(), queue, outbox.clone()),
        );
        outbox
    }

    /// The backlog of the peer at `addr`, whose gate publishers of messages
    /// for it wait on.
    pub fn backlog(self: &Arc<Self>, addr: &str) -> Arc<Backlog> {
        self.outbox(addr).backlog.clone()
    }

    /// Whether a connection to node `id` is up.
    pub fn is_connected(&self, id: u64) -> bool {
        self.conns
            .lock()
            .get(&id)
            .is_some_and(|c| !c.closed.is_cancelled())
    }

    /// Sends one peer's queued requests in order, connecting as needed.
    async fn drain_outbox(
        self: Arc<Self>,
        addr: String,
        mut queue: mpsc::UnboundedReceiver<Queued>,
        outbox: Arc<Outbox>,
    ) {
        loop {
            let (request, answer) = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                next = queue.recv() => match next { Some(n) => n, None => return },
            };
            let conn = self.conn(None, &addr).await;
            let mut direct = outbox.direct.lock();
            match conn {
                Ok(conn) => {
                    self.send_on(&conn, &addr, request, answer, &outbox.backlog);
                    *direct = Some(conn);
                }
                Err(e) => match answer {
                    Some(answer) => Waiting {
                        answer,
                        backlog: Some(outbox.backlog.clone()),
                        enqueue: matches!(request, Request::Enqueue(_)),
                    }
                    .answer(Err(e)),
                    None => outbox.backlog.done(),
                },
            }
            outbox.in_task.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Puts `request` on `conn` (the answer, if one is wanted, goes straight
    /// to `answer` from the read loop).
    fn send_on(
        &self,
        conn: &Arc<Conn>,
        addr: &str,
        request: Request,
        answer: Option<oneshot::Sender<Result<Response, LinkError>>>,
        backlog: &Arc<Backlog>,
    ) {
        let enqueue = matches!(request, Request::Enqueue(_));
        let waiting = answer.map(|answer| Waiting {
            answer,
            backlog: Some(backlog.clone()),
            enqueue,
        });
        let body = match encode(&request) {
            Ok(b) => b,
            Err(e) => {
                let e = LinkError::Unreachable {
                    addr: addr.to_owned(),
                    reason: format!("cannot encode the request: {e}"),
                };
                match waiting {
                    Some(w) => w.answer(Err(e)),
                    None => backlog.done(),
                }
                return;
            }
        };
        let Some(waiting) = waiting else {
            let _ = conn.out.send((KIND_ONEWAY, 0, Bytes::from(body)));
            backlog.done();
            return;
        };
        let rid = self.next_id.fetch_add(1, Ordering::Relaxed);
        conn.pending.lock().insert(rid, waiting);
        if conn
            .out
            .send((KIND_REQUEST, rid, Bytes::from(body)))
            .is_err()
        {
            if let Some(w) = conn.pending.lock().remove(&rid) {
                w.answer(Err(LinkError::Unreachable {
                    addr: addr.to_owned(),
                    reason: "connection closed".into(),
                }));
            }
        }
    }

    /// Sends `request` to the node at `addr` (id `id` if known) and waits
    /// for its response.
    pub async fn request(
        self: &Arc<Self>,
        id: Option<u64>,
        addr: &str,
        request: &Request,
        timeout: Duration,
    ) -> Result<(NodeInfo, Response), LinkError> {
        let attempt = async {
            let conn = self.conn(id, addr).await?;
            let rid = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            conn.pending.lock().insert(
                rid,
                Waiting {
                    answer: tx,
                    backlog: None,
                    enqueue: false,
                },
            );
            let body = encode(request).map_err(|e| LinkError::Unreachable {
                addr: addr.to_owned(),
                reason: format!("cannot encode the request: {e}"),
            })?;
            if conn
                .out
                .send((KIND_REQUEST, rid, Bytes::from(body)))
                .is_err()
            {
                conn.pending.lock().remove(&rid);
                return Err(LinkError::Unreachable {
                    addr: addr.to_owned(),
                    reason: "connection closed".into(),
                });
            }
            let response = rx.await.map_err(|_| LinkError::Unreachable {
                addr: addr.to_owned(),
                reason: "connection closed".into(),
            })??;
            Ok((conn.peer.clone(), response))
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| LinkError::Timeout(addr.to_owned()))?
    }
}

/// The sending side of a connection: frames are authenticated and
/// appended to `state.buf` in the order they are sent; a sender writes them
/// itself when the connection has been idle (see [`WRITE_THROUGH_IDLE`]),
/// otherwise the writer task ([`write_loop`]) writes what has gathered.
/// Only one of the two writes at a time (`flushing`), so frames go out in
/// order.
struct Wire {
    state: Mutex<WireState>,
    /// The socket, if senders may write it (plain TCP).
    sock: Option<tokio::net::tcp::OwnedWriteHalf>,
    key: HmacSha256,
    /// Wakes the writer task.
    wake: tokio::sync::Notify,
}

struct WireState {
    buf: BytesMut,
    seq: u64,
    /// The writer task owns the writing until `buf` is empty.
    flushing: bool,
    closed: bool,
    last_write: std::time::Instant,
}

/// The connection is closed.
#[derive(Debug)]
struct WireClosed;

impl Wire {
    /// Sends a frame: written now if the link was idle and the socket
    /// takes it, else by the writer task.
    fn send(&self, (kind, id, payload): (u8, u64, Bytes)) -> Result<(), WireClosed> {
        let mut st = self.state.lock();
        if st.closed {
            return Err(WireClosed);
        }
        // Written in place: length, tag (filled in below), body.
        let start = st.buf.len();
        st.buf.reserve(4 + TAG_LEN + 9 + payload.len());
        st.buf.put_u32((TAG_LEN + 9 + payload.len()) as u32);
        st.buf.put_bytes(0, TAG_LEN);
        st.buf.put_u8(kind);
        st.buf.put_u64(id);
        st.buf.put_slice(&payload);
        let body_at = start + 4 + TAG_LEN;
        let tag = frame_tag(&self.key, st.seq, &st.buf[body_at..]);
        st.buf[start + 4..body_at].copy_from_slice(&tag);
        st.seq += 1;
        if st.flushing {
            return Ok(());
        }
        let now = std::time::Instant::now();
        let through = self
            .sock
            .as_ref()
            .filter(|_| start == 0 && now.duration_since(st.last_write) >= WRITE_THROUGH_IDLE);
        if let Some(sock) = through {
            match sock.try_write(&st.buf) {
                Ok(n) => {
                    let len = st.buf.len();
                    let _ = st.buf.split_to(n.min(len));
                    st.last_write = now;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // The writer task finds the error too and closes.
                Err(_) => {}
            }
            if st.buf.is_empty() {
                return Ok(());
            }
        }
        st.flushing = true;
        drop(st);
        self.wake.notify_one();
        Ok(())
    }
}

/// The writer task of a connection: writes what senders left in its
/// buffer, pings an idle link, and closes the connection on a write error.
async fn write_loop(
    wire: Arc<Wire>,
    mut stream: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    closed: tokio_util::sync::CancellationToken,
) {
    let mut out = BytesMut::new();
    'serve: loop {
        let woken = tokio::select! {
            _ = closed.cancelled() => break,
            w = tokio::time::timeout(PING_INTERVAL, wire.wake.notified()) => w.is_ok(),
        };
        if !woken {
            if wire.send((KIND_PING, 0, Bytes::new())).is_err() {
                break;
            }
            continue;
        }
        loop {
            {
                let mut st = wire.state.lock();
                if st.buf.is_empty() {
                    st.flushing = false;
                    st.last_write = std::time::Instant::now();
                    break;
                }
                std::mem::swap(&mut st.buf, &mut out);
            }
            match (&mut stream, &wire.sock) {
                (Some(w), _) => {
                    let written = tokio::select! {
                        _ = closed.cancelled() => break 'serve,
                        r = async { w.write_all(&out).await?; w.flush().await } => r,
                    };
                    if written.is_err() {
                        break 'serve;
                    }
                }
                (None, Some(sock)) => {
                    while !out.is_empty() {
                        let ready = tokio::select! {
                            _ = closed.cancelled() => break 'serve,
                            r = sock.writable() => r,
                        };
                        if ready.is_err() {
                            break 'serve;
                        }
                        match sock.try_write(&out) {
                            Ok(n) => drop(out.split_to(n.min(out.len()))),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => break 'serve,
                        }
                    }
                }
                (None, None) => break 'serve,
            }
            out.clear();
        }
    }
    wire.state.lock().closed = true;
    closed.cancel();
    if let Some(w) = &mut stream {
        let _ = tokio::time::timeout(Duration::from_secs(1), w.shutdown()).await;
    }
    if let Some(sock) = &wire.sock {
        let _ = socket2::SockRef::from(sock.as_ref()).shutdown(std::net::Shutdown::Write);
    }
}

async fn read_loop(
    links: Arc<Links>,
    mut r: Box<dyn AsyncRead + Send + Unpin>,
    key: HmacSha256,
    conn: Arc<Conn>,
) {
    let mut seq = 0u64;
    let peer = conn.peer.clone();
    // Frames are cut out of one buffer that each read fills as far as the
    // socket has data: a read covers many frames, and a frame is a slice
    // of it, not a copy.
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    // Requests were handled since the last read (the handler is told
    // before the next one waits).
    let mut in_burst = false;
    let result: Result<(), String> = async {
        loop {
            let mut frame = loop {
                let mut want = READ_CHUNK;
                if buf.len() >= 4 {
                    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    if !(TAG_LEN + 9..=MAX_FRAME).contains(&len) {
                        return Err(format!("frame of {len} octets"));
                    }
                    if buf.len() >= 4 + len {
                        let _length = buf.split_to(4);
                        break buf.split_to(len).freeze();
                    }
                    // Room for the rest of it, but no more than a chunk
                    // ahead of what has arrived (a length is only a claim).
                    want = want.max((4 + len - buf.len()).min(READ_CHUNK * 4));
                }
                if std::mem::take(&mut in_burst) {
                    if let Some(handler) = links.handler.get() {
                        handler.end_of_burst(&peer);
                    }
                }
                buf.reserve(want);
                let n = tokio::select! {
                    _ = conn.closed.cancelled() => return Ok(()),
                    n = tokio::time::timeout(LINK_SILENCE, r.read_buf(&mut buf)) => match n {
                        Ok(n) => n.map_err(|e| e.to_string())?,
                        Err(_) => return Err(format!("nothing heard for {LINK_SILENCE:?}")),
                    },
                };
                if n == 0 {
                    return Err("closed by the peer".into());
                }
            };
            let tag = frame.split_to(TAG_LEN);
            if !verify(&frame_tag(&key, seq, &frame), &tag) {
                return Err("a frame failed its authentication tag".into());
            }
            seq += 1;
            // (The length check above covers these 9 octets.)
            let kind = frame.try_get_u8().map_err(|e| e.to_string())?;
            let id = frame.try_get_u64().map_err(|e| e.to_string())?;
            match kind {
                KIND_PING => {}
                KIND_RESPONSE => {
                    let Some(waiting) = conn.pending.lock().remove(&id) else {
                        continue;
                    };
                    // (A frame is whole and authenticated: one this node
                    // cannot read, from a node of another version, is
                    // that one request's failure, not the link's.)
                    match decode::<Response>(&frame) {
                        Ok(resp) => waiting.answer(Ok(resp)),
                        Err(e) => {
                            tracing::warn!(peer = %peer.name, error = %e, "an answer from a peer this node cannot read (does it run another version?)");
                            waiting.answer(Ok(Response::Unavailable(format!(
                                "node '{}' answered in a form this node cannot read (another version of Warren?): {e}",
                                peer.name
                            ))));
                        }
                    }
                }
                KIND_ONEWAY => {
                    in_burst = true;
                    let request: Request = match decode(&frame) {
                        Ok(request) => request,
                        Err(e) => {
                            tracing::warn!(peer = %peer.name, error = %e, "a one-way request from a peer this node cannot read (does it run another version?); ignored");
                            continue;
                        }
                    };
                    if let Some(handler) = links.handler.get() {
                        // Handled in the connection's order; nothing answers.
                        // Most are done at once: a task only for the rest.
                        let mut done = handler.handle(peer.clone(), request);
                        if (&mut done).now_or_never().is_none() {
                            tokio::spawn(done);
                        }
                    }
                }
                KIND_REQUEST => {
                    let out = conn.out.clone();
                    let request: Request = match decode(&frame) {
                        Ok(request) => request,
                        Err(e) => {
                            tracing::warn!(peer = %peer.name, error = %e, "a request from a peer this node cannot read (does it run another version?)");
                            let refusal = Response::Unavailable(format!(
                                "node '{}' cannot read this request (another version of Warren?): {e}",
                                links.me.name
                            ));
                            if let Ok(body) = encode(&refusal) {
                                let _ = out.send((KIND_RESPONSE, id, Bytes::from(body)));
                            }
                            continue;
                        }
                    };
                    let Some(handler) = links.handler.get().cloned() else {
                        continue;
                    };
                    // Called here, in the connection's order: what a handler
                    // does before its future's first await happens in the
                    // order requests arrived (an enqueue's ordering).
                    let mut answer = handler.handle(peer.clone(), request);
                    // An answer ready at once (an enqueue of a transient
                    // message) goes out without a task of its own.
                    let respond = move |response: Response| {
                        if let Ok(body) = encode(&response) {
                            let _ = out.send((KIND_RESPONSE, id, Bytes::from(body)));
                        }
                    };
                    match (&mut answer).now_or_never() {
                        Some(response) => respond(response),
                        None => {
                            tokio::spawn(async move { respond(answer.await) });
                        }
                    }
                }
                other => return Err(format!("unknown frame kind {other}")),
            }
        }
    }
    .await;
    if in_burst {
        if let Some(handler) = links.handler.get() {
            handler.end_of_burst(&peer);
        }
    }
    if let Err(e) = result {
        if !conn.closed.is_cancelled() {
            tracing::info!(peer = %peer.name, id = peer.id, reason = %e, "cluster connection closed");
        }
    }
    conn.closed.cancel();
    let waiting: Vec<Waiting> = conn.pending.lock().drain().map(|(_, w)| w).collect();
    for w in waiting {
        w.answer(Err(LinkError::Unreachable {
            addr: peer.cluster_addr.clone(),
            reason: "connection closed before the answer".into(),
        }));
    }
    let gone = {
        let mut conns = links.conns.lock();
        let current = conns.get(&peer.id).is_some_and(|c| Arc::ptr_eq(c, &conn));
        if current {
            conns.remove(&peer.id);
        }
        current
    };
    if gone {
        if let Some(handler) = links.handler.get() {
            handler.peer_gone(peer.id);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Answers every request it can read with `Settled`.
    struct Settles;

    impl RequestHandler for Settles {
        fn handle(
            &self,
            _from: NodeInfo,
            _request: Request,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>> {
            Box::pin(std::future::ready(Response::Settled))
        }

        fn admits(&self, _id: u64) -> Result<(), String> {
            Ok(())
        }

        fn peer_gone(&self, _id: u64) {}
    }

    fn node(id: u64, addr: &str) -> NodeInfo {
        NodeInfo {
            id,
            name: format!("n{id}@127.0.0.1"),
            cluster_addr: addr.to_owned(),
            amqp_addr: addr.to_owned(),
        }
    }

    /// A request the receiving node cannot read (a kind a newer version
    /// added, as in a rolling upgrade) is answered as unavailable, naming
    /// why, and the link goes on: the next request on the same connection
    /// is served. (It used to close the link, failing everything in flight
    /// on it.)
    #[tokio::test]
    async fn a_request_a_node_cannot_read_is_refused_and_the_link_goes_on() {
        let secret: Arc<[u8]> = Arc::from(&b"a test secret of some length"[..]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = Links::new(node(2, &addr), "test".into(), secret.clone());
        server.set_handler(Arc::new(Settles));
        tokio::spawn(server.clone().serve(listener));
        let client = Links::new(node(1, "127.0.0.1:1"), "test".into(), secret);
        client.set_handler(Arc::new(Settles));
        let conn = client.conn(Some(2), &addr).await.unwrap();
        // A variant index no version has yet (bincode: its index first).
        let rid = client.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().insert(
            rid,
            Waiting {
                answer: tx,
                backlog: None,
                enqueue: false,
            },
        );
        conn.out
            .send((KIND_REQUEST, rid, Bytes::from_static(&[250])))
            .unwrap();
        match rx.await.unwrap().unwrap() {
            Response::Unavailable(text) => {
                assert!(text.contains("cannot read this request"), "{text}")
            }
            other => panic!("answered {other:?}"),
        }
        let (_, answer) = client
            .request(
                Some(2),
                &addr,
                &Request::QueueStatus { group: 1 },
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert!(matches!(answer, Response::Settled), "{answer:?}");
        let now = client.conn(Some(2), &addr).await.unwrap();
        assert!(Arc::ptr_eq(&conn, &now), "the same connection");
    }
}
