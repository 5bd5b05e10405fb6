//! A connection's outgoing bytes: frames are encoded straight into one shared
//! buffer (by the connection's own task, or by a publisher's task delivering to
//! a consumer here), and one writer task sends whatever accumulated with a
//! single write. Under load many frames leave in one syscall; when idle, a
//! frame leaves at once.
//!
//! The buffer is bounded in the way that matters: deliveries stop (queues keep
//! the messages) while more than [`Outbox::HIGH_WATER`] octets wait, and the
//! connection is told when the writer has drained it so deliveries resume.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// Outgoing frames of one connection.
#[derive(Debug, Default)]
pub struct Outbox {
    buf: Mutex<BytesMut>,
    /// Wakes the writer.
    ready: Notify,
    /// Tells the connection that a full outbox has drained.
    drained: Notify,
    was_full: AtomicBool,
    closed: AtomicBool,
}

impl Outbox {
    /// Octets waiting above which deliveries to this connection pause.
    pub const HIGH_WATER: usize = 4 << 20;

    /// Encodes into the buffer and wakes the writer.
    pub fn write<R>(&self, f: impl FnOnce(&mut BytesMut) -> R) -> R {
        let r = f(&mut self.buf.lock());
        self.ready.notify_one();
        r
    }

    /// Whether deliveries should pause for this connection.
    pub fn is_full(&self) -> bool {
        let full = self.buf.lock().len() > Self::HIGH_WATER;
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

    /// Sends buffered frames until closed (then flushes what is left) or the
    /// socket fails.
    pub async fn run_writer<W: AsyncWrite + Unpin>(&self, mut socket: W) -> std::io::Result<()> {
        loop {
            let chunk = self.buf.lock().split();
            if chunk.is_empty() {
                if self.closed.load(Ordering::Acquire) {
                    socket.flush().await?;
                    return Ok(());
                }
                self.ready.notified().await;
                continue;
            }
            socket.write_all(&chunk).await?;
            if self.was_full.load(Ordering::Relaxed) && self.buf.lock().len() <= Self::HIGH_WATER {
                self.was_full.store(false, Ordering::Relaxed);
                self.drained.notify_one();
            }
        }
    }
}
