//! A connection's outgoing bytes: frames are encoded straight into one shared
//! buffer (by the connection's own task, or by a publisher's task delivering to
//! a consumer here), and one writer task sends whatever accumulated with a
//! single write. Under load many frames leave in one syscall.
//!
//! When the connection has been idle (nothing written for
//! [`Outbox::WRITE_THROUGH_IDLE`]) and its socket is plain TCP, the task that
//! encodes a frame writes it to the socket itself (a non-blocking write), so
//! an isolated delivery does not wait for the writer task to be scheduled,
//! often on the other core: that wake-up was most of a delivery's latency at
//! low rates. Whatever the socket does not take, and everything encoded while
//! the writer owns the buffer, goes out through the writer task, so frames
//! keep their order.
//!
//! The buffer is bounded in the way that matters: deliveries stop (queues keep
//! the messages) while more than [`Outbox::HIGH_WATER`] octets wait, and the
//! connection is told when the writer has drained it so deliveries resume.

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
    pub const WRITE_THROUGH_IDLE: Duration = Duration::from_micros(50);

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

    /// Encodes into the buffer; writes it at once if the connection was idle,
    /// else wakes the writer.
    pub fn write<R>(&self, f: impl FnOnce(&mut BytesMut) -> R) -> R {
        let mut p = self.pending.lock();
        let was_empty = p.buf.is_empty();
        let before = p.buf.len();
        let r = f(&mut p.buf);
        p.octets += p.buf.len().saturating_sub(before) as u64;
        p.writes += 1;
        if p.writing || p.buf.is_empty() {
            return r;
        }
        if was_empty && p.socket.is_some() {
            let now = Instant::now();
            if now.duration_since(p.last_write) >= Self::WRITE_THROUGH_IDLE {
                let written = match &p.socket {
                    Some(socket) => socket.try_write(&p.buf),
                    None => Ok(0),
                };
                // Full, or failed: the writer task waits for room, or meets
                // the error and ends the connection.
                match written {
                    Ok(n) if n >= p.buf.len() => p.buf.clear(),
                    Ok(n) => drop(p.buf.split_to(n)),
                    Err(_) => {}
                }
                if written.is_ok() {
                    p.last_write = now;
                }
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
        let outbox = Outbox::tcp(w);
        tokio::time::sleep(Outbox::WRITE_THROUGH_IDLE * 2).await;
        // No writer task runs: the bytes can only arrive if write wrote them.
        outbox.write(|b| b.put_slice(b"hello"));
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert!(outbox.pending.lock().buf.is_empty());
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
