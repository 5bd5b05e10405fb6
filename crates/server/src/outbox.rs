//! A connection's outgoing bytes: frames are encoded straight into one shared
//! buffer (by the connection's own task, or by a publisher's task delivering to
//! a consumer here), and one writer task sends whatever accumulated with a
//! single write. Under load many frames leave in one syscall.
//!
//! A connection task handling a batch of frames (one read) holds a [`Cork`]:
//! what the batch encodes into any connection's outbox (deliveries to
//! consumers, confirms, replies) gathers there, and when the cork drops the
//! task writes each such outbox's bytes to its plain TCP socket itself (a
//! non-blocking write): one write per connection per batch, and no wake-up
//! of a writer task, often on the other core — that wake-up was most of a
//! delivery's latency at low rates. Outside a cork, a frame encoded when the
//! connection has been idle (nothing written for
//! [`Outbox::WRITE_THROUGH_IDLE`]) is written through the same way.
//! Whatever the socket does not take, and everything encoded while the
//! writer owns the buffer, goes out through the writer task, so frames keep
//! their order.
//!
//! The buffer is bounded in the way that matters: deliveries stop (queues keep
//! the messages) while more than [`Outbox::HIGH_WATER`] octets wait, and the
//! connection is told when the writer has drained it so deliveries resume.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

/// Outgoing frames of one connection.
#[derive(Debug, Default)]
pub struct Outbox {
    pending: Mutex<Pending>,
    /// Wakes the writer.
    ready: Notify,
    /// Tells the connection that a full outbox has drained.
    drained: Notify,
    was_full: AtomicBool,
    closed: AtomicBool,
}

#[derive(Debug)]
struct Pending {
    buf: BytesMut,
    /// The writer task owns the writing until `buf` is empty.
    writing: bool,
    /// A [`Cork`] on some thread will write `buf` when it drops.
    corked: bool,
    /// When the socket last took bytes.
    last_write: Instant,
    /// The socket, while senders may write it themselves (plain TCP, until
    /// the writer ends).
    socket: Option<Arc<OwnedWriteHalf>>,
    /// Octets encoded for sending so far, and in how many writes (the
    /// management API's `send_oct` and `send_cnt`).
    octets: u64,
    writes: u64,
}

impl Default for Pending {
    fn default() -> Self {
        Pending {
            buf: BytesMut::new(),
            writing: false,
            corked: false,
            last_write: Instant::now(),
            socket: None,
            octets: 0,
            writes: 0,
        }
    }
}

impl Outbox {
    /// Octets waiting above which deliveries to this connection pause.
    pub const HIGH_WATER: usize = 4 << 20;

    /// How long the socket must have been idle for a sender to write a frame
    /// itself. Under load frames come closer together than this and gather
    /// for the writer task's single write.
    pub const WRITE_THROUGH_IDLE: Duration = Duration::from_micros(0);

    /// An outbox whose senders may write to the plain TCP `socket` when the
    /// connection is idle; [`run_tcp_writer`](Self::run_tcp_writer) writes
    /// the rest.
    pub fn tcp(socket: OwnedWriteHalf) -> Self {
        Outbox {
            pending: Mutex::new(Pending {
                socket: Some(Arc::new(socket)),
                ..Pending::default()
            }),
            ..Outbox::default()
        }
    }

    /// Encodes into the buffer. Under a [`Cork`], the cork writes it when it
    /// drops; otherwise it is written at once if the connection was idle,
    /// else the writer is woken.
    pub fn write<R>(self: &Arc<Self>, f: impl FnOnce(&mut BytesMut) -> R) -> R {
        let mut p = self.pending.lock();
        let was_empty = p.buf.is_empty();
        let before = p.buf.len();
        let r = f(&mut p.buf);
        p.octets += p.buf.len().saturating_sub(before) as u64;
        p.writes += 1;
        if p.writing || p.corked || p.buf.is_empty() {
            return r;
        }
        if p.socket.is_some() && Cork::add(self) {
            p.corked = true;
            return r;
        }
        if was_empty && p.socket.is_some() {
            let now = Instant::now();
            if now.duration_since(p.last_write) >= Self::WRITE_THROUGH_IDLE {
                p.write_through();
                if p.buf.is_empty() {
                    return r;
                }
            }
        }
        p.writing = true;
        drop(p);
        self.ready.notify_one();
        r
    }

    /// What a [`Cork`] does for this outbox as it drops: writes what
    /// gathered if nothing more is coming (or, not knowing, if the
    /// connection was idle), and leaves the rest — and everything while more
    /// is coming — to the writer. (Under load the writer's writes, each
    /// taking what gathered meanwhile, are far fewer than one per batch:
    /// writing every batch here cost S1 a tenth of its rate.)
    fn uncork(&self, more_coming: Option<bool>) {
        let mut p = self.pending.lock();
        p.corked = false;
        if p.writing || p.buf.is_empty() {
            return;
        }
        let now = match more_coming {
            Some(more) => !more,
            None => p.last_write.elapsed() >= Self::WRITE_THROUGH_IDLE,
        };
        if now {
            p.write_through();
            if p.buf.is_empty() {
                return;
            }
        }
        p.writing = true;
        drop(p);
        self.ready.notify_one();
    }

    /// Whether this connection's peer has sent bytes not read yet (a
    /// non-blocking peek); `None` if that cannot be told (TLS, closed).
    pub fn peer_has_sent(&self) -> Option<bool> {
        let socket = self.pending.lock().socket.clone()?;
        let stream: &tokio::net::TcpStream = (*socket).as_ref();
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        match socket2::SockRef::from(stream).peek(&mut byte) {
            Ok(n) => Some(n > 0),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Some(false),
            Err(_) => None,
        }
    }

    /// Octets encoded for sending so far, and in how many writes.
    pub fn sent(&self) -> (u64, u64) {
        let p = self.pending.lock();
        (p.octets, p.writes)
    }

    /// Whether deliveries should pause for this connection.
    pub fn is_full(&self) -> bool {
        let full = self.pending.lock().buf.len() > Self::HIGH_WATER;
        if full {
            self.was_full.store(true, Ordering::Relaxed);
        }
        full
    }

    /// Resolves when a full outbox has drained below the high-water mark.
    pub async fn drained(&self) {
        self.drained.notified().await;
    }

    /// Stops the writer once what is buffered has been written.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// The next bytes for the writer task, or `None` when there are none:
    /// then senders may write again themselves.
    fn take(&self) -> Option<BytesMut> {
        let mut p = self.pending.lock();
        if p.buf.is_empty() {
            p.writing = false;
            p.last_write = Instant::now();
            return None;
        }
        p.writing = true;
        Some(p.buf.split())
    }

    fn note_drained(&self) {
        if self.was_full.load(Ordering::Relaxed)
            && self.pending.lock().buf.len() <= Self::HIGH_WATER
        {
            self.was_full.store(false, Ordering::Relaxed);
            self.drained.notify_one();
        }
    }

    /// Sends buffered frames to `socket` until closed (then flushes what is
    /// left) or the socket fails.
    pub async fn run_writer<W: AsyncWrite + Unpin>(&self, mut socket: W) -> std::io::Result<()> {
        loop {
            let Some(chunk) = self.take() else {
                if self.closed.load(Ordering::Acquire) {
                    socket.flush().await?;
                    return Ok(());
                }
                self.ready.notified().await;
                continue;
            };
            socket.write_all(&chunk).await?;
            self.note_drained();
        }
    }

    /// The writer of an outbox made by [`tcp`](Self::tcp): as
    /// [`run_writer`](Self::run_writer), on the socket senders share. When it
    /// ends, senders no longer write and the socket's sending side is shut
    /// down (once the last sender lets go of it).
    pub async fn run_tcp_writer(&self) -> std::io::Result<()> {
        let socket = self.pending.lock().socket.clone();
        let result = match &socket {
            Some(socket) => self.write_shared(socket).await,
            None => Ok(()),
        };
        self.pending.lock().socket = None;
        result
    }

    async fn write_shared(&self, socket: &OwnedWriteHalf) -> std::io::Result<()> {
        loop {
            let Some(mut chunk) = self.take() else {
                if self.closed.load(Ordering::Acquire) {
                    return Ok(());
                }
                self.ready.notified().await;
                continue;
            };
            while !chunk.is_empty() {
                socket.writable().await?;
                match socket.try_write(&chunk) {
                    Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        let _ = chunk.split_to(n.min(chunk.len()));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            self.note_drained();
        }
    }
}

impl Pending {
    /// Writes what the socket takes now, without waiting (the caller holds
    /// the lock: frames stay in order). Full, or failed: the writer task
    /// waits for room, or meets the error and ends the connection.
    fn write_through(&mut self) {
        let written = match &self.socket {
            Some(socket) => socket.try_write(&self.buf),
            None => return,
        };
        match written {
            Ok(n) if n >= self.buf.len() => self.buf.clear(),
            Ok(n) => drop(self.buf.split_to(n)),
            Err(_) => {}
        }
        if written.is_ok() {
            // After the write, not before: a write that woke the reader and
            // lost the core to it for a while must not count as idle time
            // (that turned every delivery of a busy queue into a write).
            self.last_write = Instant::now();
        }
    }
}

thread_local! {
    /// The outboxes written under this thread's [`Cork`], if one is held.
    static CORKED: RefCell<Option<Vec<Arc<Outbox>>>> = const { RefCell::new(None) };
}

/// While held, frames encoded on this thread into plain TCP outboxes gather
/// there; when it drops, each such outbox is written once (see the module
/// comment). Not `Send`, so it cannot be held across an `.await`: a batch is
/// synchronous. A cork made under another is a no-op; the outer one writes.
#[derive(Debug)]
pub struct Cork {
    outer: bool,
    /// Whether the batch's peer has more for this connection (see
    /// [`Cork::more_coming`]).
    more_coming: Option<bool>,
    _not_send: PhantomData<*const ()>,
}

impl Cork {
    pub fn new() -> Cork {
        let outer = CORKED.with(|c| {
            let mut c = c.borrow_mut();
            if c.is_some() {
                return false;
            }
            *c = Some(Vec::new());
            true
        });
        Cork {
            outer,
            more_coming: None,
            _not_send: PhantomData,
        }
    }

    /// A cork whose batch is one of many (a backlog coming back from
    /// disk): what it gathers is left to the writers.
    pub fn for_writers() -> Cork {
        let mut cork = Cork::new();
        cork.more_coming(Some(true));
        cork
    }

    /// Tells the cork whether more is coming from the peer whose frames
    /// made this batch (`None`: unknown). Nothing more: what gathered is
    /// written when the cork drops (the batch was the last for now, and a
    /// lone delivery should not wait for a writer task's turn). More coming:
    /// the writers take it, so that a stream of batches leaves in few large
    /// writes.
    pub fn more_coming(&mut self, more: Option<bool>) {
        self.more_coming = more;
    }

    /// Whether any outbox waits for this cork (then it matters whether
    /// more is coming; otherwise the peek can be saved).
    pub fn gathered(&self) -> bool {
        CORKED.with(|c| c.borrow().as_ref().is_some_and(|list| !list.is_empty()))
    }

    /// Takes `outbox` into this thread's cork; `false` if none is held.
    fn add(outbox: &Arc<Outbox>) -> bool {
        CORKED.with(|c| match c.borrow_mut().as_mut() {
            Some(list) => {
                list.push(outbox.clone());
                true
            }
            None => false,
        })
    }
}

impl Default for Cork {
    fn default() -> Self {
        Cork::new()
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        if !self.outer {
            return;
        }
        // (Taken out first: nothing written while uncorking is corked.)
        let corked = CORKED.with(|c| c.borrow_mut().take()).unwrap_or_default();
        for outbox in corked {
            outbox.uncork(self.more_coming);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use tokio::io::AsyncReadExt;

    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    #[tokio::test]
    async fn an_idle_connection_is_written_by_the_sender_itself() {
        let (client, mut server) = pair().await;
        let (_r, w) = client.into_split();
        let outbox = Arc::new(Outbox::tcp(w));
        tokio::time::sleep(Outbox::WRITE_THROUGH_IDLE * 2).await;
        // No writer task runs: the bytes can only arrive if write wrote them.
        outbox.write(|b| b.put_slice(b"hello"));
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert!(outbox.pending.lock().buf.is_empty());
    }

    #[tokio::test]
    async fn a_batch_under_a_cork_leaves_in_one_write_when_nothing_more_is_coming() {
        let (client, mut server) = pair().await;
        let (_r, w) = client.into_split();
        let outbox = Arc::new(Outbox::tcp(w));
        {
            let mut cork = Cork::new();
            // A nested cork is a no-op: the outer one writes.
            let inner = Cork::new();
            for i in 0u8..3 {
                outbox.write(|b| b.put_slice(&[i; 4]));
            }
            drop(inner);
            // Nothing written yet, not even the first (the connection was idle).
            assert_eq!(outbox.pending.lock().buf.len(), 12);
            assert!(cork.gathered());
            cork.more_coming(Some(false));
        }
        // No writer task runs: the bytes can only arrive if the cork wrote them.
        assert!(outbox.pending.lock().buf.is_empty());
        let mut got = [0u8; 12];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(outbox.sent(), (12, 3));
    }

    #[tokio::test]
    async fn with_more_coming_a_corked_batch_is_left_to_the_writer() {
        let (client, mut server) = pair().await;
        let (_r, w) = client.into_split();
        let outbox = Arc::new(Outbox::tcp(w));
        {
            let _cork = Cork::for_writers();
            outbox.write(|b| b.put_slice(b"abc"));
        }
        // Handed to the writer, which has not run yet.
        assert_eq!(outbox.pending.lock().buf.len(), 3);
        assert!(outbox.pending.lock().writing);
        let writer = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.run_tcp_writer().await }
        });
        let mut got = [0u8; 3];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abc");
        outbox.close();
        writer.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_peer_that_sent_bytes_not_read_yet_is_seen() {
        let (client, mut server) = pair().await;
        let (_r, w) = client.into_split();
        let outbox = Outbox::tcp(w);
        assert_eq!(outbox.peer_has_sent(), Some(false));
        tokio::io::AsyncWriteExt::write_all(&mut server, b"x")
            .await
            .unwrap();
        // (Loopback: the byte is queued once write_all returned; the peek
        // may still race the kernel's delivery, so wait for readability.)
        _r.readable().await.unwrap();
        assert_eq!(outbox.peer_has_sent(), Some(true));
    }

    #[tokio::test]
    async fn frames_keep_their_order_through_sender_and_writer() {
        let (client, mut server) = pair().await;
        let (_r, w) = client.into_split();
        let outbox = Arc::new(Outbox::tcp(w));
        let writer = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.run_tcp_writer().await }
        });
        // Many writes, some idle gaps (written through), some bursts (left
        // for the writer), and more than a socket buffer holds at once.
        let mut expected = Vec::new();
        for i in 0u32..2_000 {
            let len = if i % 100 == 0 { 64 * 1024 } else { 16 };
            let frame: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
            outbox.write(|b| b.put_slice(&frame));
            expected.extend_from_slice(&frame);
            if i % 50 == 0 {
                tokio::time::sleep(Outbox::WRITE_THROUGH_IDLE * 2).await;
            }
        }
        outbox.close();
        let read = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        writer.await.unwrap().unwrap();
        // The writer let go of the socket: with the sender's copy gone too,
        // the peer sees the end of the stream.
        assert!(outbox.pending.lock().socket.is_none());
        drop(outbox);
        drop(_r);
        let got = read.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes arrived out of order");
    }
}
