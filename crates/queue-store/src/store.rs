//! [`Store`]: the durable store the broker talks to, with group commit.
//!
//! Writes are queued in memory by [`Store::submit`] (never blocking, never
//! touching the disk on the caller's thread) and applied by one writer thread.
//! [`Store::commit`] returns a future that resolves once everything submitted
//! before it is fsync'd: the server sends publisher confirms, `tx.commit-ok`
//! and durable `declare-ok`s only then. The writer takes whatever accumulated
//! while it was busy as one batch and syncs once for all of it, so an idle
//! broker syncs immediately (low latency) and a busy one shares each fsync
//! among every publish that arrived during the previous one (group commit).
//!
//! ```text
//!  callers ──submit(writes)──▶ pending ◀──commit()── callers (await)
//!                                │ swap when the writer is free
//!                                ▼
//!                   writer thread: apply batch ─▶ fsync ─▶ wake committers
//! ```
//!
//! Message bodies are reference-counted by the storage engine, in the order
//! the writer applies them ([`Write::PutMessage`] per queue that keeps it,
//! [`Store::release`] when a queue lets go): the body is written once and
//! deleted when the last reference goes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use amqp_codec::FieldTable;
use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::oneshot;

use crate::damage::RepairReport;
use crate::definitions::DefKind;
use crate::error::StoreError;
use crate::flow::FlowGate;
use crate::message::{Message, MessageId};
use crate::segment_log::SegmentLogStorage;
use crate::storage::{IndexEntry, SCHEMA_VERSION, Storage, Write};

/// What the store found on disk when it opened.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every stored definition.
    pub definitions: Vec<(DefKind, Bytes, FieldTable)>,
    /// Each durable queue's index entries, in FIFO order, by queue id.
    pub queues: HashMap<u64, Vec<(u64, IndexEntry)>>,
    /// Whether the previous run shut down cleanly. After a crash, every
    /// recovered message may have been delivered and is marked redelivered.
    pub clean_shutdown: bool,
    /// Messages deleted because no queue referenced them (a crash between
    /// acknowledging and deleting, or a non-durable queue's paged messages).
    pub orphans_removed: usize,
}

/// Counters an operator would look for.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Batches written.
    pub batches: AtomicU64,
    /// Writes applied.
    pub writes: AtomicU64,
    /// fsyncs performed (a commit with nothing new to sync performs none).
    pub syncs: AtomicU64,
    /// Commit waiters released (publishes confirmed, transactions committed...).
    pub commits: AtomicU64,
    /// Messages written, one per queue that keeps it (RabbitMQ's
    /// `disk_writes`).
    pub messages_written: AtomicU64,
    /// Messages read back from disk (paging in; not those still waiting to
    /// be written; RabbitMQ's `disk_reads`).
    pub messages_read: AtomicU64,
    /// Octets of message bodies (and their per-message overhead) in the
    /// batches written.
    pub bytes_written: AtomicU64,
    /// Time spent applying batches (writing), microseconds.
    pub write_micros: AtomicU64,
    /// Time spent in fsyncs, microseconds.
    pub sync_micros: AtomicU64,
    /// Queue index entries written or removed.
    pub index_writes: AtomicU64,
    /// Definitions written or removed (metadata transactions).
    pub definition_writes: AtomicU64,
    /// Reads of stored messages (one per load, or per batch of a queue's
    /// next bodies).
    pub reads: AtomicU64,
    /// Octets of message bodies read.
    pub bytes_read: AtomicU64,
    /// Time spent reading, microseconds.
    pub read_micros: AtomicU64,
}

impl StoreStats {
    fn timed<T>(micros: &AtomicU64, f: impl FnOnce() -> T) -> T {
        let start = std::time::Instant::now();
        let out = f();
        micros.fetch_add(
            u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        out
    }

    fn note_read(&self, messages: &[&Message]) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.messages_read
            .fetch_add(messages.len() as u64, Ordering::Relaxed);
        let bytes: u64 = messages.iter().map(|m| m.size()).sum();
        self.bytes_read.fetch_add(bytes, Ordering::Relaxed);
    }
}

type Waiter = oneshot::Sender<Result<(), StoreError>>;

/// Bodies submitted but not yet applied, with how many of their puts (one per
/// queue taking a reference) are still pending.
type Unwritten = DashMap<MessageId, (Arc<Message>, u32)>;

/// Default for [`Store::set_backlog_limit`].
pub const DEFAULT_BACKLOG_LIMIT: u64 = 64 << 20;

/// How long the writer waits idle before syncing writes no commit asked for.
const IDLE_SYNC: std::time::Duration = std::time::Duration::from_millis(200);

/// Counted per message in the backlog besides its body (record, bookkeeping).
const MESSAGE_OVERHEAD: u64 = 64;

#[derive(Default)]
struct Pending {
    writes: Vec<Write>,
    /// Message octets in `writes` (bodies to be written).
    bytes: u64,
    waiters: Vec<Waiter>,
    closed: bool,
    /// The writer failed; every later commit fails with this.
    failed: Option<StoreError>,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Raised while more than `backlog_limit` message octets wait for the
    /// writer; publishers that wrote to the store then pause.
    flow: Arc<FlowGate>,
    backlog_limit: AtomicU64,
}

/// The durable store.
pub struct Store {
    storage: Arc<dyn Storage>,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Bodies submitted but not yet applied by the writer, so that a paged
    /// message can be loaded the moment after it was paged out.
    unwritten: Arc<Unwritten>,
    /// The next counter of [`MessageId::new`].
    next_message: AtomicU64,
    /// See [`Store::node_tag`].
    node_tag: u16,
    stats: Arc<StoreStats>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("unwritten", &self.unwritten.len())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the store in `dir` and recovers its contents. A directory with
    /// damage a crash cannot explain is refused ([`StoreError::Damaged`]).
    pub fn open(dir: &Path) -> Result<(Store, Recovered), StoreError> {
        Self::with_storage(Arc::new(SegmentLogStorage::open(dir)?))
    }

    /// Opens the store in `dir`, moving whatever is damaged to
    /// `<dir>/quarantine/` instead of refusing it, and recovers what is
    /// left. The report says what was moved and which queue entries and
    /// bodies that cost.
    pub fn repair(dir: &Path) -> Result<(Store, Recovered, RepairReport), StoreError> {
        let (storage, mut report) = SegmentLogStorage::open_with(dir, true)?;
        let census = storage.message_census()?;
        report.orphaned_bodies = census.orphans;
        let (store, recovered) = Self::with_storage(Arc::new(storage))?;
        Ok((store, recovered, report))
    }

    /// Opens a store over any [`Storage`] and recovers its contents.
    pub fn with_storage(storage: Arc<dyn Storage>) -> Result<(Store, Recovered), StoreError> {
        match storage.meta("schema")? {
            None => storage.set_meta("schema", Some(&SCHEMA_VERSION.to_be_bytes()))?,
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_slice())
                    .map(u32::from_be_bytes)
                    .unwrap_or(0);
                if found != SCHEMA_VERSION {
                    return Err(StoreError::SchemaMismatch {
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
            }
        }
        let clean_shutdown = storage.take_clean_shutdown()?;

        let mut recovered = Recovered {
            definitions: storage.definitions()?,
            clean_shutdown,
            ..Recovered::default()
        };
        recovered.queues = storage.queue_indexes()?;
        let census = storage.message_census()?;
        let messages = census.referenced;
        let node_tag = node_tag(storage.as_ref())?;
        let next_counter = census.max_counters.get(&node_tag).copied().unwrap_or(0) + 1;
        let orphans: Vec<Write> = census
            .orphans
            .into_iter()
            .map(Write::DeleteMessage)
            .collect();
        recovered.orphans_removed = orphans.len();
        storage.apply(&orphans)?;
        storage.sync()?;

        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            flow: Arc::default(),
            backlog_limit: AtomicU64::new(DEFAULT_BACKLOG_LIMIT),
        });
        let stats = Arc::new(StoreStats::default());
        let unwritten = Arc::new(DashMap::new());
        let writer = {
            let (storage, shared, stats) = (storage.clone(), shared.clone(), stats.clone());
            let unwritten = unwritten.clone();
            std::thread::Builder::new()
                .name("warren-store-writer".into())
                .spawn(move || write_loop(storage.as_ref(), &shared, &stats, &unwritten))
                .map_err(|e| StoreError::Engine(format!("cannot start writer thread: {e}")))?
        };
        let store = Store {
            storage,
            shared,
            writer: Mutex::new(Some(writer)),
            unwritten,
            next_message: AtomicU64::new(next_counter),
            node_tag,
            stats,
        };
        if !clean_shutdown && recovered.definitions.is_empty() && recovered.queues.is_empty() {
            // A new (or never stopped) empty store: nothing to recover.
            tracing::info!("store opened (empty)");
        } else {
            tracing::info!(
                queues = recovered.queues.len(),
                messages,
                orphans = recovered.orphans_removed,
                clean_shutdown,
                "store recovered"
            );
        }
        Ok((store, recovered))
    }

    /// A fresh message id.
    pub fn next_message_id(&self) -> MessageId {
        MessageId::new(
            self.node_tag,
            self.next_message.fetch_add(1, Ordering::Relaxed),
        )
    }

    /// This store's node tag: random (1..=65535) when the store was first
    /// opened by a build that tags, and kept in its metadata. Message ids
    /// carry it, so ids from different nodes' stores do not collide (a
    /// cluster may later assign tags instead of drawing them).
    pub fn node_tag(&self) -> u16 {
        self.node_tag
    }

    /// Counters.
    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// Why the writer stopped, if a write or sync failed (a full disk, an
    /// I/O error): every commit since fails with it, until a restart
    /// recovers what is on disk.
    pub fn failure(&self) -> Option<StoreError> {
        lock(&self.shared.pending).failed.clone()
    }

    /// The gate raised while the writer is behind by more than the backlog
    /// limit: publishers whose messages were written should stop reading
    /// from their sockets until it lowers (at half the limit).
    pub fn flow(&self) -> &Arc<FlowGate> {
        &self.shared.flow
    }

    /// Sets the backlog limit: message octets submitted but not yet written
    /// (default 64 MiB).
    pub fn set_backlog_limit(&self, bytes: u64) {
        self.shared
            .backlog_limit
            .store(bytes.max(1), Ordering::Relaxed);
    }

    /// Queues writes for the writer thread. Never blocks on I/O.
    ///
    /// [`Write::PutMessage`] takes a reference on the message: its body is
    /// written only for the first. Use [`Store::release`] to drop one.
    pub fn submit(&self, writes: impl IntoIterator<Item = Write>) {
        let mut pending = lock(&self.shared.pending);
        for w in writes {
            if let Write::PutMessage(m) = &w {
                let mut e = self.unwritten.entry(m.id).or_insert_with(|| {
                    pending.bytes += m.size() + MESSAGE_OVERHEAD;
                    (m.clone(), 0)
                });
                e.1 += 1;
            }
            pending.writes.push(w);
        }
        if pending.bytes > self.shared.backlog_limit.load(Ordering::Relaxed) {
            self.shared.flow.raise();
        }
        drop(pending);
        self.shared.wake.notify_one();
    }

    /// Drops one reference to a stored message; the last one deletes it.
    ///
    /// The writer counts references in the order it applies writes, so a
    /// release can never overtake the reference it drops, nor a delete a new
    /// reference submitted after it.
    pub fn release(&self, id: MessageId) {
        lock(&self.shared.pending)
            .writes
            .push(Write::DeleteMessage(id));
        self.shared.wake.notify_one();
    }

    /// A future that resolves once every write submitted before this call is
    /// on disk. The commit point for confirms, transactions and declares.
    pub fn commit(&self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.shared.pending);
            match (&pending.failed, pending.closed) {
                (Some(e), _) => {
                    let _ = tx.send(Err(e.clone()));
                }
                (None, true) => {
                    let _ = tx.send(Err(StoreError::Closed));
                }
                (None, false) => pending.waiters.push(tx),
            }
        }
        self.shared.wake.notify_one();
        async move { rx.await.unwrap_or(Err(StoreError::Closed)) }
    }

    /// Reads a stored message (paging in, recovery). A sled read: usually
    /// served from its cache, but it may touch the disk, so async callers
    /// should not call it on a runtime worker for many messages in a row.
    pub fn load(&self, id: MessageId) -> Result<Option<Arc<Message>>, StoreError> {
        if let Some(m) = self.unwritten.get(&id) {
            return Ok(Some(m.0.clone()));
        }
        let read = StoreStats::timed(&self.stats.read_micros, || self.storage.message(id))?;
        match &read {
            Some(m) => self.stats.note_read(&[m]),
            None => self.stats.note_read(&[]),
        }
        Ok(read.map(Arc::new))
    }

    /// Loads messages likely stored together (a queue's next paged bodies,
    /// in order), each as [`Store::load`] would: the engine may read whole
    /// segments rather than each record alone.
    pub fn load_in_order(
        &self,
        ids: &[MessageId],
    ) -> Vec<Result<Option<Arc<Message>>, StoreError>> {
        // Each id is looked up in the unwritten ones once: one that is
        // written meanwhile is still read from there (its `Arc` is kept).
        let unwritten: Vec<Option<Arc<Message>>> = ids
            .iter()
            .map(|id| self.unwritten.get(id).map(|m| m.0.clone()))
            .collect();
        let stored: Vec<MessageId> = ids
            .iter()
            .zip(&unwritten)
            .filter(|(_, m)| m.is_none())
            .map(|(id, _)| *id)
            .collect();
        let from_storage = StoreStats::timed(&self.stats.read_micros, || {
            self.storage.messages_in_order(&stored)
        });
        let read: Vec<&Message> = from_storage
            .iter()
            .filter_map(|m| m.as_ref().ok().and_then(Option::as_ref))
            .collect();
        self.stats.note_read(&read);
        let mut from_storage = from_storage.into_iter();
        unwritten
            .into_iter()
            .map(|m| match m {
                Some(m) => Ok(Some(m)),
                None => from_storage
                    .next()
                    .unwrap_or(Ok(None))
                    .map(|m| m.map(Arc::new)),
            })
            .collect()
    }

    /// Flushes everything, marks the shutdown clean and stops the writer.
    pub fn close(&self) -> Result<(), StoreError> {
        {
            let mut pending = lock(&self.shared.pending);
            if pending.closed {
                return Ok(());
            }
            pending.closed = true;
        }
        self.shared.wake.notify_one();
        // Nobody may wait on a store that is gone.
        self.shared.flow.lower();
        if let Some(handle) = lock(&self.writer).take() {
            let _ = handle.join();
        }
        if let Some(e) = lock(&self.shared.pending).failed.clone() {
            return Err(e);
        }
        self.storage.mark_clean()?;
        self.storage.sync()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "store did not close cleanly");
        }
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the
/// pending list stays consistent: every mutation is a push or a swap).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_loop(storage: &dyn Storage, shared: &Shared, stats: &StoreStats, unwritten: &Unwritten) {
    let mut writes = Vec::new();
    let mut waiters = Vec::new();
    // Applied writes no commit asked to sync yet: synced once the writer has
    // been idle a while, so that an idle broker's removals and acks reach
    // the disk too.
    let mut unsynced = false;
    loop {
        let closing;
        let batch_bytes;
        let failed;
        {
            let mut pending = lock(&shared.pending);
            while pending.writes.is_empty() && pending.waiters.is_empty() && !pending.closed {
                if !unsynced {
                    pending = shared
                        .wake
                        .wait(pending)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    continue;
                }
                let (guard, timeout) = shared
                    .wake
                    .wait_timeout(pending, IDLE_SYNC)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                pending = guard;
                if timeout.timed_out()
                    && pending.writes.is_empty()
                    && pending.waiters.is_empty()
                    && pending.failed.is_none()
                {
                    drop(pending);
                    // Removals can take a few syncs (see `Storage::needs_sync`).
                    unsynced = match StoreStats::timed(&stats.sync_micros, || storage.sync()) {
                        Ok(()) => storage.needs_sync(),
                        Err(e) => {
                            tracing::error!(error = %e, "store sync failed; refusing further commits");
                            lock(&shared.pending).failed = Some(e);
                            false
                        }
                    };
                    stats.syncs.fetch_add(1, Ordering::Relaxed);
                    pending = lock(&shared.pending);
                }
            }
            std::mem::swap(&mut writes, &mut pending.writes);
            std::mem::swap(&mut waiters, &mut pending.waiters);
            batch_bytes = std::mem::take(&mut pending.bytes);
            closing = pending.closed;
            failed = pending.failed.clone();
        }
        // After a failure nothing more is written: what is on disk stays as
        // it was, for the next open to recover.
        let mut result = failed.map_or(Ok(()), Err);
        let writes_were_empty = writes.is_empty();
        if !writes.is_empty() {
            if result.is_ok() {
                result = StoreStats::timed(&stats.write_micros, || storage.apply(&writes));
            }
            // Written (or failed for good): readers now go to the storage
            // once no other reference's put of the body is still pending.
            let (mut messages, mut index, mut definitions) = (0, 0, 0);
            for w in &writes {
                match w {
                    Write::PutIndex { .. }
                    | Write::DeleteIndex { .. }
                    | Write::DeleteQueueIndex { .. } => index += 1,
                    Write::PutDefinition { .. } | Write::DeleteDefinition { .. } => {
                        definitions += 1;
                    }
                    _ => {}
                }
                if let Write::PutMessage(m) = w {
                    messages += 1;
                    if let dashmap::Entry::Occupied(mut e) = unwritten.entry(m.id) {
                        e.get_mut().1 -= 1;
                        if e.get().1 == 0 {
                            e.remove();
                        }
                    }
                }
            }
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats
                .writes
                .fetch_add(writes.len() as u64, Ordering::Relaxed);
            stats
                .messages_written
                .fetch_add(messages, Ordering::Relaxed);
            stats.index_writes.fetch_add(index, Ordering::Relaxed);
            stats
                .definition_writes
                .fetch_add(definitions, Ordering::Relaxed);
            stats
                .bytes_written
                .fetch_add(batch_bytes, Ordering::Relaxed);
            writes.clear();
        }
        if result.is_ok() && (!waiters.is_empty() || closing) {
            // With nothing applied since the last sync, what the waiters wait
            // for is on disk already (a confirm for transient messages).
            if unsynced || !writes_were_empty || closing || storage.needs_sync() {
                result = StoreStats::timed(&stats.sync_micros, || storage.sync());
                stats.syncs.fetch_add(1, Ordering::Relaxed);
            }
            unsynced = result.is_ok() && storage.needs_sync();
        } else if !writes_were_empty && result.is_ok() {
            unsynced = true;
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, "store write failed; refusing further commits");
            lock(&shared.pending).failed = Some(e.clone());
        }
        // What accumulated while this batch was written is the backlog now.
        if shared.flow.is_raised() {
            let behind = lock(&shared.pending).bytes;
            if behind <= shared.backlog_limit.load(Ordering::Relaxed) / 2 {
                shared.flow.lower();
                tracing::debug!(batch_bytes, behind, "store caught up; publishers resume");
            }
        }
        stats
            .commits
            .fetch_add(waiters.len() as u64, Ordering::Relaxed);
        for w in waiters.drain(..) {
            let _ = w.send(result.clone());
        }
        if closing && lock(&shared.pending).writes.is_empty() {
            return;
        }
    }
}

/// The store's node tag, drawn and kept in its metadata on first use.
fn node_tag(storage: &dyn Storage) -> Result<u16, StoreError> {
    if let Some(v) = storage.meta("node-tag")? {
        if let Ok(b) = <[u8; 2]>::try_from(v.as_slice()) {
            let tag = u16::from_be_bytes(b);
            if tag != 0 {
                return Ok(tag);
            }
        }
    }
    let tag: u16 = rand::random_range(1..=u16::MAX);
    storage.set_meta("node-tag", Some(&tag.to_be_bytes()))?;
    Ok(tag)
}
