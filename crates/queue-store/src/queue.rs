//! [`Queue`]: one queue's contents and RabbitMQ's queue semantics, as a pure
//! state machine. Time comes in as an argument (milliseconds since the Unix
//! epoch), so TTL, expiry and limits are tested with a controllable clock.
//!
//! Every operation that changes what must be on disk or what must happen next
//! reports it in [`Effects`]: storage writes, message references released,
//! and messages to dead-letter. The caller (the server) applies them in this
//! order: build and route the dead letters (loading paged bodies first), then
//! submit the writes, then release the references.
//!
//! Ready messages sit in one FIFO per priority level, ordered by sequence
//! number; a requeued message goes back to its original position. Delivered
//! messages wait in `unacked` until acknowledged, rejected or requeued.
//! Bodies stay in memory up to a budget; past it, entries keep only the
//! message id and the body is read back from the store when delivered.
//!
//! Entries themselves stay in memory up to a window per priority level: with
//! a spill directory set ([`Queue::set_spill_dir`]), the entries behind the
//! window go to spill files in chunks ([`crate::spill`]) and come back a chunk
//! at a time as the head drains, so a deep backlog costs memory for its window
//! only. A bucket is `front` (in memory) ‖ spilled chunks ‖ `back` (in memory,
//! filling up to the next chunk).
//!
//! No spill I/O happens here, under the caller's lock: a chunk is encoded
//! and placed, and [`Queue::spill_io`] hands the caller the writes (new
//! chunks), the reads (the next chunk of a level whose head runs low) and
//! the files to close, to run elsewhere ([`SpillIo::run`]) and report back
//! ([`Queue::spill_io_done`]). A chunk not yet written is read from memory;
//! a level whose next chunk is still on disk when its head runs dry waits
//! for the read (`stalled`); purging or deleting hands chunks still on disk
//! to the caller to release ([`Effects::spilled_removals`]).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use amqp_codec::{FieldTable, ShortStr};
use rustc_hash::FxHashMap;

use crate::args::{Overflow, QueueArgs};
use crate::dead_letter::{DeadLetter, DeadLetterReason, dead_letter};
use crate::message::{Message, MessageId};
use crate::spill::{ChunkPlace, Spill, SpillFile};
use crate::storage::{IndexEntry, Write};

/// Default per-queue budget of message body octets kept in memory.
pub const DEFAULT_MEMORY_BUDGET: u64 = 64 << 20;

/// Entries a priority level keeps at its head before new ones queue behind
/// (to be spilled).
const WINDOW: usize = 8192;

/// Entries per spilled chunk.
const CHUNK: usize = 4096;

/// Octets of one entry in a spilled chunk.
const SPILLED_ENTRY_LEN: usize = 8 + IndexEntry::LEN + 1;

/// A message as a queue holds it: in memory, or only its id (paged out).
#[derive(Debug, Clone, PartialEq)]
pub enum MessageRef {
    /// The message is in memory.
    Loaded(Arc<Message>),
    /// The body is in the store; load it with [`crate::Store::load`].
    Paged(MessageId),
}

impl MessageRef {
    /// The message's id.
    pub fn id(&self) -> MessageId {
        match self {
            MessageRef::Loaded(m) => m.id,
            MessageRef::Paged(id) => *id,
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    msg: MessageRef,
    size: u32,
    /// Expiry time in ms since the epoch; 0 = never.
    expires_at: u64,
    delivery_count: u32,
    redelivered: bool,
    priority: u8,
    /// Has an index entry on disk (durable queue, persistent message).
    indexed: bool,
    /// Holds a reference on a stored body.
    stored: bool,
}

impl Entry {
    /// Appends the spill encoding of a paged-out entry: its sequence number
    /// (u64 BE), its [`IndexEntry`] encoding, and whether it has an index
    /// entry on disk and a reference on a stored body (flags).
    fn encode_spilled(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.index_entry().encode());
        out.push(u8::from(self.indexed) | u8::from(self.stored) << 1);
    }

    fn decode_spilled(b: &[u8]) -> Option<Entry> {
        let (seq, rest) = b.split_first_chunk::<8>()?;
        let (flags, index) = rest.split_last()?;
        let e = IndexEntry::decode(index)?;
        Some(Entry {
            seq: u64::from_be_bytes(*seq),
            msg: MessageRef::Paged(e.message),
            size: e.size,
            expires_at: e.expires_at,
            delivery_count: e.delivery_count,
            redelivered: e.delivered,
            priority: e.priority,
            indexed: flags & 1 != 0,
            stored: flags & 2 != 0,
        })
    }

    fn index_entry(&self) -> IndexEntry {
        IndexEntry {
            message: self.msg.id(),
            expires_at: self.expires_at,
            delivery_count: self.delivery_count,
            size: self.size,
            priority: self.priority,
            delivered: self.redelivered,
        }
    }
}

/// What [`Queue::image`] captures of a queue held in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueImage {
    /// The sequence number the next message gets.
    pub next_seq: u64,
    /// Its last use, for `x-expires`.
    pub last_used_ms: u64,
    /// Ready messages, in delivery order.
    pub ready: Vec<ImageEntry>,
    /// Delivered, unsettled messages, by sequence number.
    pub unacked: Vec<ImageEntry>,
}

/// One message of a [`QueueImage`].
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEntry {
    /// Its sequence number in the queue.
    pub seq: u64,
    /// The message.
    pub message: Arc<Message>,
    /// Expiry in ms since the epoch; 0 = never.
    pub expires_at: u64,
    /// Times returned unsettled (`x-delivery-count`).
    pub delivery_count: u32,
    /// Delivered before.
    pub redelivered: bool,
}

/// A message handed to a consumer or `basic.get`.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The queue's handle for it: pass it back to ack, reject or requeue.
    pub seq: u64,
    /// The message (load it if paged).
    pub message: MessageRef,
    /// Whether it was delivered before.
    pub redelivered: bool,
    /// How often it was returned unacknowledged (`x-delivery-count`).
    pub delivery_count: u32,
    /// Ready messages left in the queue (`basic.get-ok` message-count).
    pub remaining: u64,
}

/// A message leaving the queue for its dead-letter exchange. Turn it into a
/// [`DeadLetter`] with [`DeadLetterRequest::build`] once the body is at hand.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterRequest {
    /// The message.
    pub message: MessageRef,
    /// Why.
    pub reason: DeadLetterReason,
    /// The queue it leaves.
    pub queue: ShortStr,
    /// The queue's `x-dead-letter-exchange`.
    pub exchange: ShortStr,
    /// The queue's `x-dead-letter-routing-key`.
    pub routing_key: Option<ShortStr>,
}

impl DeadLetterRequest {
    /// The copy to publish to the dead-letter exchange.
    pub fn build(&self, message: &Message, now_ms: u64) -> DeadLetter {
        dead_letter(
            message,
            &self.queue,
            self.reason,
            &self.exchange,
            self.routing_key.as_ref(),
            now_ms / 1000,
        )
    }
}

/// What an operation asks of the caller.
#[derive(Debug, Default)]
pub struct Effects {
    /// Storage writes, in order.
    pub writes: Vec<Write>,
    /// Stored message references to release (after the writes).
    pub releases: Vec<MessageId>,
    /// Messages to dead-letter.
    pub dead_letters: Vec<DeadLetterRequest>,
    /// Messages discarded without dead-lettering (no DLX), by reason.
    pub discarded: Vec<DeadLetterReason>,
    /// Spilled chunks of removed entries still on disk: read them off the
    /// lock ([`SpilledRemoval::run`]) for the writes and releases they owe.
    pub spilled_removals: Vec<SpilledRemoval>,
}

impl Effects {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
            && self.releases.is_empty()
            && self.dead_letters.is_empty()
            && self.discarded.is_empty()
            && self.spilled_removals.is_empty()
    }

    /// Empties it for reuse.
    pub fn clear(&mut self) {
        self.writes.clear();
        self.releases.clear();
        self.dead_letters.clear();
        self.discarded.clear();
        self.spilled_removals.clear();
    }
}

/// What became of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// The queue took it.
    Accepted,
    /// `x-overflow: reject-publish(-dlx)` refused it: nack the publisher.
    Rejected,
}

/// The longest per-message TTL accepted: ten years in ms, as for `x-message-ttl`.
pub const MAX_EXPIRATION_MS: u64 = 315_360_000_000;

/// Parses the `expiration` property: a non-negative integer number of ms, at
/// most [`MAX_EXPIRATION_MS`].
pub fn parse_expiration(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|ms| *ms <= MAX_EXPIRATION_MS)
}

/// One priority level's ready entries, oldest first: `front`, then the
/// spilled chunks, then `back`. When `front` is empty, so are the others (it
/// is refilled as it empties).
#[derive(Debug, Default)]
struct Bucket {
    front: VecDeque<Entry>,
    /// Spilled chunks, oldest first.
    spilled: VecDeque<Chunk>,
    spilled_count: u64,
    back: VecDeque<Entry>,
    /// This level's spill files (one set per level, so a level nobody
    /// consumes cannot pin the files of one that drains).
    spill: Option<Spill>,
    next_chunk: u64,
}

/// A spilled chunk of entries.
#[derive(Debug)]
struct Chunk {
    id: u64,
    /// Entries in it, and their message octets (ready bytes).
    entries: u32,
    bytes: u64,
    place: ChunkPlace,
    data: ChunkData,
}

/// Where a spilled chunk's encoding is.
#[derive(Debug)]
enum ChunkData {
    /// In memory only, its write pending or in flight (`writing`).
    Unwritten { data: Arc<Vec<u8>>, writing: bool },
    /// On disk only.
    OnDisk,
    /// On disk, being read back.
    Reading,
    /// On disk and read back: ready to become the head.
    Read(Arc<Vec<u8>>),
}

impl Chunk {
    fn in_memory(&self) -> Option<&Arc<Vec<u8>>> {
        match &self.data {
            ChunkData::Unwritten { data, .. } | ChunkData::Read(data) => Some(data),
            ChunkData::OnDisk | ChunkData::Reading => None,
        }
    }
}

impl Bucket {
    fn len(&self) -> u64 {
        (self.front.len() + self.back.len()) as u64 + self.spilled_count
    }

    /// `front` is empty but entries wait behind it (its next chunk is being
    /// read, or a refill failed).
    fn stalled(&self) -> bool {
        self.front.is_empty() && !(self.back.is_empty() && self.spilled.is_empty())
    }
}

/// One queue's messages.
#[derive(Debug)]
pub struct Queue {
    id: u64,
    name: ShortStr,
    durable: bool,
    args: QueueArgs,
    arguments: FieldTable,
    buckets: Vec<Bucket>,
    /// Where entries behind the window go (none: all stay in memory).
    spill_dir: Option<Arc<Path>>,
    /// Entries a level keeps at its head, and per spilled chunk.
    window: usize,
    chunk: usize,
    unacked: FxHashMap<u64, Entry>,
    next_seq: u64,
    ready_bytes: u64,
    loaded_bytes: u64,
    unacked_bytes: u64,
    memory_budget: u64,
    last_used_ms: u64,
    /// See [`Queue::take_zero_ttl_published`].
    zero_ttl_published: bool,
    /// Spill I/O waits to be taken ([`Queue::take_spill_io_wanted`]).
    spill_io_wanted: bool,
}

impl Queue {
    /// An empty queue. `id` is the queue's storage id (unique per store).
    pub fn new(
        id: u64,
        name: ShortStr,
        durable: bool,
        args: QueueArgs,
        arguments: FieldTable,
        now_ms: u64,
    ) -> Queue {
        let levels = usize::from(args.max_priority.unwrap_or(0)) + 1;
        Queue {
            id,
            name,
            durable,
            args,
            arguments,
            buckets: (0..levels).map(|_| Bucket::default()).collect(),
            spill_dir: None,
            window: WINDOW,
            chunk: CHUNK,
            unacked: FxHashMap::default(),
            next_seq: 1,
            ready_bytes: 0,
            loaded_bytes: 0,
            unacked_bytes: 0,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            last_used_ms: now_ms,
            zero_ttl_published: false,
            spill_io_wanted: false,
        }
    }

    /// A durable queue rebuilt from its index entries (in FIFO order). After
    /// an unclean shutdown every message is marked redelivered: it may have
    /// been delivered before the crash.
    pub fn recover(
        id: u64,
        name: ShortStr,
        args: QueueArgs,
        arguments: FieldTable,
        entries: Vec<(u64, IndexEntry)>,
        clean_shutdown: bool,
        now_ms: u64,
    ) -> Queue {
        let mut q = Queue::new(id, name, true, args, arguments, now_ms);
        q.restore(entries, clean_shutdown);
        q
    }

    /// Adds a durable queue's recovered index entries (in FIFO order) to a
    /// new queue. With a spill directory set first, a deep queue spills as it
    /// is rebuilt instead of holding every entry in memory at once. After an
    /// unclean shutdown every message is marked redelivered.
    pub fn restore(
        &mut self,
        entries: impl IntoIterator<Item = (u64, IndexEntry)>,
        clean_shutdown: bool,
    ) {
        let mut writes = Vec::new();
        for (seq, e) in entries {
            let entry = Entry {
                seq,
                msg: MessageRef::Paged(e.message),
                size: e.size,
                expires_at: e.expires_at,
                delivery_count: e.delivery_count,
                redelivered: e.delivered || !clean_shutdown,
                priority: e.priority.min(self.max_level()),
                indexed: true,
                stored: true,
            };
            self.ready_bytes += u64::from(e.size);
            if seq >= self.next_seq {
                self.next_seq = seq + 1;
                self.push_new(entry, &mut writes);
                if self.spill_io_wanted {
                    self.spill_io_inline();
                }
            } else {
                self.insert_ready(entry);
            }
        }
        debug_assert!(writes.is_empty(), "stored entries need no writes");
    }

    /// Lets entries behind the in-memory window go to spill files in `dir`
    /// (the broker's data directory's `spill/`). Entries already queued past
    /// the window (a recovered queue) are spilled now.
    pub fn set_spill_dir(&mut self, dir: Option<Arc<Path>>) {
        self.spill_dir = dir;
        if self.spill_dir.is_none() {
            return;
        }
        let mut writes = Vec::new();
        for level in 0..self.buckets.len() {
            let Some(bucket) = self.buckets.get_mut(level) else {
                continue;
            };
            // Only entries whose bodies are in the store (all of a recovered
            // queue's) can go without writing anything.
            if !bucket.spilled.is_empty()
                || !bucket.back.is_empty()
                || bucket.front.len() <= self.window + self.chunk
                || bucket.front.iter().any(|e| !e.stored)
            {
                continue;
            }
            // Queued again behind the window, as if just published: spilled a
            // chunk at a time, the last partial chunk too.
            let rest = bucket.front.split_off(self.window);
            for entry in rest {
                self.push_new(entry, &mut writes);
                if self.spill_io_wanted {
                    self.spill_io_inline();
                }
            }
            self.spill_back(level, &mut writes);
        }
        self.spill_io_inline();
        debug_assert!(writes.is_empty(), "stored entries need no writes");
    }

    /// Runs the pending spill I/O right here: only for a queue nobody else
    /// sees yet (rebuilt at boot), so that a deep one streams to its spill
    /// files instead of holding every chunk in memory.
    fn spill_io_inline(&mut self) {
        self.spill_io_wanted = false;
        let io = self.spill_io();
        if !io.is_empty() {
            let done = io.run();
            self.spill_io_done(done);
        }
    }

    /// Sets the in-memory window and the chunk size, in entries (defaults
    /// 8192 and 4096; tests use tiny ones to spill a handful of messages).
    pub fn set_spill_window(&mut self, window: usize, chunk: usize) {
        self.window = window;
        self.chunk = chunk.max(1);
    }

    /// Entries held in spill files (an operator metric; tests use it).
    pub fn spilled_count(&self) -> u64 {
        self.buckets.iter().map(|b| b.spilled_count).sum()
    }

    /// Storage id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Name.
    pub fn name(&self) -> &ShortStr {
        &self.name
    }

    /// Whether the queue survives restarts.
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// Parsed arguments.
    pub fn args(&self) -> &QueueArgs {
        &self.args
    }

    /// Arguments as declared.
    pub fn arguments(&self) -> &FieldTable {
        &self.arguments
    }

    /// Ready messages.
    pub fn ready_count(&self) -> u64 {
        self.buckets.iter().map(Bucket::len).sum()
    }

    /// Body octets of ready messages.
    pub fn ready_bytes(&self) -> u64 {
        self.ready_bytes
    }

    /// Delivered, unacknowledged messages.
    pub fn unacked_count(&self) -> u64 {
        self.unacked.len() as u64
    }

    /// Body octets of delivered, unacknowledged messages.
    pub fn unacked_bytes(&self) -> u64 {
        self.unacked_bytes
    }

    /// Body octets of ready messages held in memory.
    pub fn loaded_bytes(&self) -> u64 {
        self.loaded_bytes
    }

    /// Sets how many body octets of ready messages stay in memory.
    pub fn set_memory_budget(&mut self, bytes: u64) {
        self.memory_budget = bytes;
    }

    /// Notes a use (consume, get, redeclare) for `x-expires`.
    pub fn touch(&mut self, now_ms: u64) {
        self.last_used_ms = now_ms;
    }

    /// When the queue is due for deletion by `x-expires` if it stays unused
    /// (the caller knows whether it has consumers, which also count as use).
    pub fn unused_deadline(&self) -> Option<u64> {
        self.args
            .expires
            .map(|e| self.last_used_ms.saturating_add(e))
    }

    fn max_level(&self) -> u8 {
        (self.buckets.len() - 1) as u8
    }

    fn level_of(&self, msg: &Message) -> u8 {
        if self.buckets.len() == 1 {
            return 0;
        }
        msg.header
            .properties
            .priority()
            .unwrap_or(0)
            .min(self.max_level())
    }

    /// Puts a ready entry back at its original position (a requeue; also
    /// recovery, in order). That is always ahead of anything spilled:
    /// everything spilled was queued behind it when it was delivered.
    fn insert_ready(&mut self, entry: Entry) {
        let Some(bucket) = self.buckets.get_mut(usize::from(entry.priority)) else {
            return;
        };
        let part = if bucket.back.front().is_some_and(|b| b.seq < entry.seq) {
            &mut bucket.back
        } else {
            &mut bucket.front
        };
        match part.back() {
            Some(last) if last.seq > entry.seq => {
                let pos = part.partition_point(|e| e.seq < entry.seq);
                part.insert(pos, entry);
            }
            _ => part.push_back(entry),
        }
    }

    /// Appends a published entry: at the head's window while it has room and
    /// nothing is queued behind it, otherwise behind, where a full chunk is
    /// spilled (`writes` gets the bodies that chunk pages out).
    #[inline]
    fn push_new(&mut self, entry: Entry, writes: &mut Vec<Write>) {
        let level = usize::from(entry.priority);
        let spilling = self.spill_dir.is_some();
        let (window, chunk) = (self.window, self.chunk);
        let Some(bucket) = self.buckets.get_mut(level) else {
            return;
        };
        // Hot path: nothing queued behind the head and room in its window.
        if bucket.back.is_empty()
            && bucket.spilled.is_empty()
            && (!spilling || bucket.front.len() < window)
        {
            bucket.front.push_back(entry);
            return;
        }
        bucket.back.push_back(entry);
        if spilling && bucket.back.len() >= chunk {
            self.spill_back(level, writes);
        }
    }

    /// Encodes a level's `back` as one spilled chunk, to be written off the
    /// lock ([`Queue::spill_io`]). Entries with their body in memory are
    /// paged out first (`writes` gets the body of any not yet in the store).
    fn spill_back(&mut self, level: usize, writes: &mut Vec<Write>) {
        let Some(dir) = self.spill_dir.clone() else {
            return;
        };
        let Some(bucket) = self.buckets.get_mut(level).filter(|b| !b.back.is_empty()) else {
            return;
        };
        let mut data = Vec::with_capacity(bucket.back.len() * SPILLED_ENTRY_LEN);
        let mut bytes = 0u64;
        for e in &mut bucket.back {
            if let MessageRef::Loaded(m) = &e.msg {
                if !e.stored {
                    writes.push(Write::PutMessage(m.clone()));
                    e.stored = true;
                }
                self.loaded_bytes -= u64::from(e.size);
                e.msg = MessageRef::Paged(m.id);
            }
            bytes += u64::from(e.size);
            e.encode_spilled(&mut data);
        }
        let Ok(len) = u32::try_from(data.len()) else {
            return;
        };
        let place = bucket
            .spill
            .get_or_insert_with(|| Spill::new(dir))
            .place(len);
        let entries = bucket.back.len() as u32;
        bucket.back.clear();
        bucket.spilled.push_back(Chunk {
            id: bucket.next_chunk,
            entries,
            bytes,
            place,
            data: ChunkData::Unwritten {
                data: Arc::new(data),
                writing: false,
            },
        });
        bucket.next_chunk += 1;
        bucket.spilled_count += u64::from(entries);
        self.spill_io_wanted = true;
    }

    /// Refills a level's empty `front`: the next spilled chunk if it is in
    /// memory, or `back`. A chunk still on disk is asked for (the level
    /// stalls until it is read).
    #[cold]
    fn refill(&mut self, level: usize) {
        let Some(bucket) = self.buckets.get_mut(level) else {
            return;
        };
        if !bucket.front.is_empty() {
            return;
        }
        let Some(chunk) = bucket.spilled.front() else {
            std::mem::swap(&mut bucket.front, &mut bucket.back);
            return;
        };
        let Some(data) = chunk.in_memory().cloned() else {
            self.spill_io_wanted = true;
            return;
        };
        let Some(chunk) = bucket.spilled.pop_front() else {
            return;
        };
        bucket.spilled_count -= u64::from(chunk.entries);
        bucket.front.extend(
            data.chunks_exact(SPILLED_ENTRY_LEN)
                .filter_map(Entry::decode_spilled),
        );
        if let Some(spill) = bucket.spill.as_mut() {
            spill.consumed(&chunk.place);
        }
    }

    /// Whether spill I/O waits to be taken with [`Queue::spill_io`]; clears
    /// the flag. The caller runs it soon after (its housekeeping task).
    pub fn take_spill_io_wanted(&mut self) -> bool {
        std::mem::take(&mut self.spill_io_wanted)
    }

    /// The spill I/O to run off the lock: every chunk not yet written, the
    /// next chunk of each level whose head is down to half its window, and
    /// the files to close. Each is marked in flight until
    /// [`Queue::spill_io_done`].
    pub fn spill_io(&mut self) -> SpillIo {
        let mut io = SpillIo {
            queue: self.name.clone(),
            writes: Vec::new(),
            reads: Vec::new(),
            released: Vec::new(),
        };
        let writing = self.spill_dir.is_some();
        let low = self.window / 2;
        for (level, bucket) in self.buckets.iter_mut().enumerate() {
            if let Some(spill) = bucket.spill.as_mut() {
                io.released.extend(spill.take_released());
            }
            let head_low = bucket.front.len() <= low;
            for (i, chunk) in bucket.spilled.iter_mut().enumerate() {
                match &mut chunk.data {
                    ChunkData::Unwritten { data, writing: w } if writing && !*w => {
                        *w = true;
                        io.writes.push(SpillWrite {
                            level,
                            id: chunk.id,
                            place: chunk.place.clone(),
                            data: data.clone(),
                        });
                    }
                    ChunkData::OnDisk if i == 0 && head_low => {
                        chunk.data = ChunkData::Reading;
                        io.reads.push(SpillRead {
                            level,
                            id: chunk.id,
                            place: chunk.place.clone(),
                        });
                    }
                    _ => {}
                }
            }
        }
        io
    }

    /// Takes back what [`SpillIo::run`] did: written chunks leave memory
    /// (unless next in line), read ones wait to become the head, and a
    /// stalled level is refilled. A failed write stops the queue spilling
    /// (its chunks stay in memory); a failed read is tried again later.
    pub fn spill_io_done(&mut self, done: SpillIoDone) {
        let low = self.window / 2;
        for (level, id, result) in done.writes {
            let Some(bucket) = self.buckets.get_mut(level) else {
                continue;
            };
            let head_low = bucket.front.len() <= low;
            let Some((i, chunk)) = bucket
                .spilled
                .iter_mut()
                .enumerate()
                .find(|(_, c)| c.id == id)
            else {
                continue; // consumed from memory meanwhile
            };
            let ChunkData::Unwritten { data, writing } = &mut chunk.data else {
                continue;
            };
            match result {
                Ok(()) if i == 0 && head_low => chunk.data = ChunkData::Read(data.clone()),
                Ok(()) => chunk.data = ChunkData::OnDisk,
                Err(e) => {
                    *writing = false;
                    if self.spill_dir.take().is_some() {
                        tracing::warn!(queue = %self.name, error = %e, "cannot spill queue entries; keeping them in memory");
                    }
                }
            }
        }
        for (level, id, result) in done.reads {
            let Some(chunk) = self
                .buckets
                .get_mut(level)
                .and_then(|b| b.spilled.iter_mut().find(|c| c.id == id))
            else {
                continue;
            };
            if !matches!(chunk.data, ChunkData::Reading) {
                continue;
            }
            match result {
                Ok(data) => chunk.data = ChunkData::Read(Arc::new(data)),
                Err(e) => {
                    // Tried again the next time the level asks for it.
                    tracing::error!(queue = %self.name, error = %e, "cannot read spilled queue entries");
                    chunk.data = ChunkData::OnDisk;
                }
            }
        }
        for level in 0..self.buckets.len() {
            if self.buckets.get(level).is_some_and(Bucket::stalled) {
                self.refill(level);
            }
        }
    }

    /// Takes every spilled chunk out of the queue, as for a purge: those in
    /// memory are decoded into `out`; those on disk are handed to the caller
    /// in `fx` (read off the lock for their writes and releases; index
    /// deletions only if `delete_index`: a deleted queue drops its index
    /// whole). Returns the number of entries handed over.
    fn drain_spilled(&mut self, out: &mut Vec<Entry>, delete_index: bool, fx: &mut Effects) -> u64 {
        let mut handed = 0;
        for bucket in &mut self.buckets {
            for chunk in std::mem::take(&mut bucket.spilled) {
                bucket.spilled_count -= u64::from(chunk.entries);
                if let Some(spill) = bucket.spill.as_mut() {
                    spill.consumed(&chunk.place);
                }
                match chunk.in_memory() {
                    Some(data) => out.extend(
                        data.chunks_exact(SPILLED_ENTRY_LEN)
                            .filter_map(Entry::decode_spilled),
                    ),
                    None => {
                        self.ready_bytes -= chunk.bytes;
                        handed += u64::from(chunk.entries);
                        fx.spilled_removals.push(SpilledRemoval {
                            queue: self.id,
                            delete_index,
                            place: chunk.place,
                        });
                    }
                }
            }
        }
        handed
    }

    /// Removes the head of a level, refilling it from behind.
    #[inline]
    fn pop_level(&mut self, level: usize) -> Option<Entry> {
        let bucket = self.buckets.get_mut(level)?;
        let entry = bucket.front.pop_front()?;
        if bucket.front.is_empty() && bucket.stalled() {
            self.refill(level);
        } else if bucket.front.len() <= self.window / 2
            && bucket
                .spilled
                .front()
                .is_some_and(|c| matches!(c.data, ChunkData::OnDisk))
        {
            // Read the next chunk while the rest of the head drains (asked
            // once: it is `Reading` from then on).
            self.spill_io_wanted = true;
        }
        Some(entry)
    }

    fn over_limit(&self) -> bool {
        self.args
            .max_length
            .is_some_and(|max| self.ready_count() > max)
            || self
                .args
                .max_length_bytes
                .is_some_and(|max| self.ready_bytes > max)
    }

    fn would_exceed(&self, size: u64) -> bool {
        self.args
            .max_length
            .is_some_and(|max| self.ready_count() >= max)
            || self
                .args
                .max_length_bytes
                .is_some_and(|max| self.ready_bytes + size > max)
    }

    fn dead_letter_or_discard(&self, msg: MessageRef, reason: DeadLetterReason, fx: &mut Effects) {
        match &self.args.dead_letter_exchange {
            Some(dlx) => fx.dead_letters.push(DeadLetterRequest {
                message: msg,
                reason,
                queue: self.name.clone(),
                exchange: dlx.clone(),
                routing_key: self.args.dead_letter_routing_key.clone(),
            }),
            None => fx.discarded.push(reason),
        }
    }

    /// Forgets an entry that left the queue for good.
    fn finish(&self, entry: &Entry, fx: &mut Effects) {
        if entry.indexed {
            fx.writes.push(Write::DeleteIndex {
                queue: self.id,
                seq: entry.seq,
            });
        }
        if entry.stored {
            fx.releases.push(entry.msg.id());
        }
    }

    /// Removes the next ready message (highest priority, oldest first).
    #[inline]
    fn pop_ready(&mut self) -> Option<Entry> {
        // The highest level with a head; a level whose head is empty has
        // nothing behind it either, unless a refill failed (stalled).
        let mut level = None;
        for l in (0..self.buckets.len()).rev() {
            let Some(bucket) = self.buckets.get(l) else {
                continue;
            };
            if bucket.front.is_empty() {
                if !bucket.stalled() {
                    continue;
                }
                self.refill(l);
                if self.buckets.get(l).is_none_or(|b| b.front.is_empty()) {
                    // Its next chunk is being read: nothing of a lower
                    // priority overtakes it meanwhile.
                    return None;
                }
            }
            level = Some(l);
            break;
        }
        let entry = self.pop_level(level?)?;
        self.ready_bytes -= u64::from(entry.size);
        if matches!(entry.msg, MessageRef::Loaded(_)) {
            self.loaded_bytes -= u64::from(entry.size);
        }
        Some(entry)
    }

    /// The level `pop_ready` takes from next: the highest with a head
    /// (without refilling a stalled one).
    fn next_level(&self) -> Option<usize> {
        (0..self.buckets.len())
            .rev()
            .find(|&l| self.buckets.get(l).is_some_and(|b| !b.front.is_empty()))
    }

    /// The id of the next message [`Queue::deliver`] would hand out, if its
    /// body is paged out: the broker loads it off the lock first
    /// ([`Queue::paged_heads`], [`Queue::page_in`]).
    pub fn paged_head(&self) -> Option<MessageId> {
        let head = self.buckets.get(self.next_level()?)?.front.front()?;
        match head.msg {
            MessageRef::Paged(id) => Some(id),
            MessageRef::Loaded(_) => None,
        }
    }

    /// The ids of paged-out bodies among the first `scan` ready messages of
    /// each level's in-memory head, highest level first (delivery order):
    /// at most `max_count` of them, stopping once they add up to `max_bytes`.
    pub fn paged_heads(&self, scan: usize, max_count: usize, max_bytes: u64) -> Vec<MessageId> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for bucket in self.buckets.iter().rev() {
            for e in bucket.front.iter().take(scan) {
                if out.len() >= max_count || bytes >= max_bytes {
                    return out;
                }
                if let MessageRef::Paged(id) = e.msg {
                    out.push(id);
                    bytes += u64::from(e.size);
                }
            }
        }
        out
    }

    /// Whether some ready message has its body paged out (or its entry
    /// spilled).
    pub fn has_paged(&self) -> bool {
        self.loaded_bytes < self.ready_bytes
    }

    /// Gives ready messages among the first `scan` of each level's head
    /// their loaded bodies back (loaded off the lock after
    /// [`Queue::paged_heads`]). Returns how many took one (a message may
    /// have been delivered, expired or purged meanwhile).
    pub fn page_in(&mut self, loaded: Vec<Arc<Message>>, scan: usize) -> usize {
        let mut by_id: FxHashMap<MessageId, Arc<Message>> =
            loaded.into_iter().map(|m| (m.id, m)).collect();
        let mut taken = 0;
        for bucket in self.buckets.iter_mut().rev() {
            for e in bucket.front.iter_mut().take(scan) {
                if by_id.is_empty() {
                    break;
                }
                if let MessageRef::Paged(id) = e.msg {
                    if let Some(m) = by_id.remove(&id) {
                        e.msg = MessageRef::Loaded(m);
                        self.loaded_bytes += u64::from(e.size);
                        taken += 1;
                    }
                }
            }
        }
        taken
    }

    /// Every message of a queue that holds them all in memory (no spill
    /// directory, nothing paged out), with the state a snapshot needs to
    /// rebuild it exactly ([`Queue::from_image`]); `None` if some are on
    /// disk. Ready messages come in delivery order, unacknowledged ones by
    /// sequence number.
    pub fn image(&self) -> Option<QueueImage> {
        let entry_image = |e: &Entry| match &e.msg {
            MessageRef::Loaded(m) => Some(ImageEntry {
                seq: e.seq,
                message: m.clone(),
                expires_at: e.expires_at,
                delivery_count: e.delivery_count,
                redelivered: e.redelivered,
            }),
            MessageRef::Paged(_) => None,
        };
        let mut ready = Vec::new();
        for bucket in self.buckets.iter().rev() {
            if !bucket.spilled.is_empty() {
                return None;
            }
            for e in bucket.front.iter().chain(&bucket.back) {
                ready.push(entry_image(e)?);
            }
        }
        let mut unacked = self
            .unacked
            .values()
            .map(entry_image)
            .collect::<Option<Vec<_>>>()?;
        unacked.sort_unstable_by_key(|e| e.seq);
        Some(QueueImage {
            next_seq: self.next_seq,
            last_used_ms: self.last_used_ms,
            ready,
            unacked,
        })
    }

    /// A queue held in memory only (not durable, no spill directory, no
    /// memory budget: nothing paged), rebuilt from an [`image`](Self::image)
    /// of one made the same way. Used for a replicated queue's state, whose
    /// durability is its log.
    pub fn from_image(
        id: u64,
        name: ShortStr,
        args: QueueArgs,
        arguments: FieldTable,
        image: QueueImage,
    ) -> Queue {
        let mut q = Queue::in_memory(id, name, args, arguments, image.last_used_ms);
        q.next_seq = image.next_seq;
        let ready = image.ready.into_iter().map(|e| (false, e));
        let unacked = image.unacked.into_iter().map(|e| (true, e));
        for (unacked, e) in ready.chain(unacked) {
            let entry = Entry {
                seq: e.seq,
                size: u32::try_from(e.message.size()).unwrap_or(u32::MAX),
                priority: q.level_of(&e.message),
                msg: MessageRef::Loaded(e.message),
                expires_at: e.expires_at,
                delivery_count: e.delivery_count,
                redelivered: e.redelivered,
                indexed: false,
                stored: false,
            };
            if unacked {
                q.unacked_bytes += u64::from(entry.size);
                q.unacked.insert(entry.seq, entry);
            } else {
                q.ready_bytes += u64::from(entry.size);
                q.loaded_bytes += u64::from(entry.size);
                q.insert_ready(entry);
            }
        }
        q
    }

    /// An empty queue held in memory only: not durable (no storage
    /// writes), no spill directory, no memory budget (nothing paged). Its
    /// whole state is then a function of the calls made on it, which is what
    /// a replicated queue's state machine needs.
    pub fn in_memory(
        id: u64,
        name: ShortStr,
        args: QueueArgs,
        arguments: FieldTable,
        now_ms: u64,
    ) -> Queue {
        let mut q = Queue::new(id, name, false, args, arguments, now_ms);
        q.memory_budget = u64::MAX;
        q
    }

    /// Enqueues a published message.
    pub fn publish(&mut self, msg: &Arc<Message>, now_ms: u64, fx: &mut Effects) -> Enqueued {
        let size = msg.size();
        if self.args.overflow != Overflow::DropHead && self.would_exceed(size) {
            if self.args.overflow == Overflow::RejectPublishDlx {
                self.dead_letter_or_discard(
                    MessageRef::Loaded(msg.clone()),
                    DeadLetterReason::MaxLen,
                    fx,
                );
            }
            return Enqueued::Rejected;
        }
        let ttl = [
            self.args.message_ttl,
            msg.header
                .properties
                .expiration()
                .and_then(|e| parse_expiration(&e)),
        ]
        .into_iter()
        .flatten()
        .min();
        let indexed = self.durable && msg.is_persistent();
        let paged = self.loaded_bytes + size > self.memory_budget;
        let stored = indexed || paged;
        if stored {
            fx.writes.push(Write::PutMessage(msg.clone()));
        }
        let entry = Entry {
            seq: self.next_seq,
            msg: if paged {
                MessageRef::Paged(msg.id)
            } else {
                MessageRef::Loaded(msg.clone())
            },
            size: u32::try_from(size).unwrap_or(u32::MAX),
            expires_at: ttl.map_or(0, |t| now_ms.saturating_add(t)),
            delivery_count: 0,
            redelivered: false,
            priority: self.level_of(msg),
            indexed,
            stored,
        };
        self.next_seq += 1;
        if indexed {
            fx.writes.push(Write::PutIndex {
                queue: self.id,
                seq: entry.seq,
                entry: entry.index_entry(),
            });
        }
        self.ready_bytes += u64::from(entry.size);
        if !paged {
            self.loaded_bytes += u64::from(entry.size);
        }
        self.push_new(entry, &mut fx.writes);
        self.drop_heads_over_limit(fx);
        self.zero_ttl_published |= ttl == Some(0);
        Enqueued::Accepted
    }

    /// Whether a message with a TTL of 0 was published since the last call:
    /// then [`Queue::expire_undelivered`] has work once the consumers had
    /// their chance (no clock read per publish otherwise).
    pub fn take_zero_ttl_published(&mut self) -> bool {
        std::mem::take(&mut self.zero_ttl_published)
    }

    /// Dead-letters (or drops) the oldest ready messages while the queue is
    /// over its length limits: for `drop-head` on publish, and on requeue
    /// for `drop-head` only (RabbitMQ drops heads there too; the
    /// reject-publish modes refuse only new publishes).
    fn drop_heads_over_limit(&mut self, fx: &mut Effects) {
        while self.over_limit() {
            let Some(head) = self.pop_ready() else { break };
            self.dead_letter_or_discard(head.msg.clone(), DeadLetterReason::MaxLen, fx);
            self.finish(&head, fx);
        }
    }

    /// Replaces the arguments in effect (a policy changed): the TTL applies to
    /// messages published from now on, limits at once — with `drop-head` the
    /// oldest ready messages over a new length limit are dead-lettered (or
    /// dropped), as RabbitMQ does when a policy lowers a limit. Properties
    /// fixed at declaration (priorities, single active consumer, queue type)
    /// are kept.
    pub fn set_effective_args(&mut self, mut args: QueueArgs, fx: &mut Effects) {
        args.max_priority = self.args.max_priority;
        args.single_active_consumer = self.args.single_active_consumer;
        args.queue_type = self.args.queue_type;
        self.args = args;
        if self.args.overflow == Overflow::DropHead {
            self.drop_heads_over_limit(fx);
        }
    }

    /// Dead-letters (or discards) expired messages at the heads of the queue.
    /// Like RabbitMQ, a message expires only once it reaches the head.
    pub fn expire(&mut self, now_ms: u64, fx: &mut Effects) {
        self.expire_before(now_ms, fx);
    }

    /// [`Queue::expire`], counting messages that expire at `now_ms` as
    /// expired: run after a publish was offered to the consumers, so that a
    /// message with a TTL of 0 that none could take goes at once (RabbitMQ
    /// delivers such a message only if a consumer takes it right away).
    pub fn expire_undelivered(&mut self, now_ms: u64, fx: &mut Effects) {
        self.expire_before(now_ms.saturating_add(1), fx);
    }

    fn expire_before(&mut self, now_ms: u64, fx: &mut Effects) {
        for level in 0..self.buckets.len() {
            if self.buckets.get(level).is_some_and(Bucket::stalled) {
                self.refill(level);
            }
            loop {
                let expired = self
                    .buckets
                    .get(level)
                    .and_then(|b| b.front.front())
                    .is_some_and(|e| e.expires_at != 0 && e.expires_at < now_ms);
                if !expired {
                    break;
                }
                let Some(entry) = self.pop_level(level) else {
                    break;
                };
                self.ready_bytes -= u64::from(entry.size);
                if matches!(entry.msg, MessageRef::Loaded(_)) {
                    self.loaded_bytes -= u64::from(entry.size);
                }
                self.dead_letter_or_discard(entry.msg.clone(), DeadLetterReason::Expired, fx);
                self.finish(&entry, fx);
            }
        }
    }

    /// The next time [`Queue::expire`] has work (ms since the epoch).
    pub fn next_expiry(&self) -> Option<u64> {
        self.buckets
            .iter()
            .filter_map(|b| b.front.front())
            .filter(|e| e.expires_at != 0)
            .map(|e| e.expires_at.saturating_add(1))
            .min()
    }

    /// Takes the next ready message for delivery (expiring stale heads first).
    /// With `ack` false (no-ack consumer, `basic.get` no-ack) the message is
    /// settled at once; otherwise it waits in `unacked`.
    pub fn deliver(&mut self, now_ms: u64, ack: bool, fx: &mut Effects) -> Option<Delivery> {
        self.expire(now_ms, fx);
        let entry = self.pop_ready()?;
        // Whatever expired behind it is now at the head: drop it now, as
        // RabbitMQ does, so the reported count is right.
        self.expire(now_ms, fx);
        let delivery = Delivery {
            seq: entry.seq,
            message: entry.msg.clone(),
            redelivered: entry.redelivered,
            delivery_count: entry.delivery_count,
            remaining: self.ready_count(),
        };
        if ack {
            self.unacked_bytes += u64::from(entry.size);
            self.unacked.insert(entry.seq, entry);
        } else {
            self.finish(&entry, fx);
        }
        Some(delivery)
    }

    /// Acknowledges a delivery. Returns false if `seq` is not unacked here.
    pub fn ack(&mut self, seq: u64, fx: &mut Effects) -> bool {
        match self.unacked.remove(&seq) {
            Some(entry) => {
                self.unacked_bytes -= u64::from(entry.size);
                self.finish(&entry, fx);
                true
            }
            None => false,
        }
    }

    /// Rejects a delivery without requeueing: dead-lettered (`rejected`) or discarded.
    pub fn reject(&mut self, seq: u64, fx: &mut Effects) -> bool {
        match self.unacked.remove(&seq) {
            Some(entry) => {
                self.unacked_bytes -= u64::from(entry.size);
                self.dead_letter_or_discard(entry.msg.clone(), DeadLetterReason::Rejected, fx);
                self.finish(&entry, fx);
                true
            }
            None => false,
        }
    }

    /// Returns a delivery to its original position, marked redelivered. Over
    /// `x-delivery-limit`, it is dead-lettered (`delivery_limit`) instead.
    pub fn requeue(&mut self, seq: u64, fx: &mut Effects) -> bool {
        let Some(mut entry) = self.unacked.remove(&seq) else {
            return false;
        };
        self.unacked_bytes -= u64::from(entry.size);
        entry.delivery_count = entry.delivery_count.saturating_add(1);
        entry.redelivered = true;
        if self
            .args
            .delivery_limit
            .is_some_and(|limit| u64::from(entry.delivery_count) > limit)
        {
            self.dead_letter_or_discard(entry.msg.clone(), DeadLetterReason::DeliveryLimit, fx);
            self.finish(&entry, fx);
            return true;
        }
        if entry.indexed {
            fx.writes.push(Write::PutIndex {
                queue: self.id,
                seq: entry.seq,
                entry: entry.index_entry(),
            });
        }
        self.ready_bytes += u64::from(entry.size);
        if matches!(entry.msg, MessageRef::Loaded(_)) {
            self.loaded_bytes += u64::from(entry.size);
        }
        self.insert_ready(entry);
        if self.args.overflow == Overflow::DropHead {
            self.drop_heads_over_limit(fx);
        }
        true
    }

    /// Removes every ready message (`queue.purge`); returns how many.
    pub fn purge(&mut self, fx: &mut Effects) -> u64 {
        let mut entries = Vec::new();
        let mut n = self.drain_spilled(&mut entries, true, fx);
        for entry in entries {
            self.ready_bytes -= u64::from(entry.size);
            self.finish(&entry, fx);
            n += 1;
        }
        while let Some(entry) = self.pop_ready() {
            self.finish(&entry, fx);
            n += 1;
        }
        n
    }

    /// Removes everything (`queue.delete`); returns the number of ready
    /// messages, as `delete-ok` reports.
    pub fn delete(&mut self, fx: &mut Effects) -> u64 {
        let ready = self.ready_count();
        let durable = self.durable;
        let mut entries: Vec<Entry> = self.unacked.drain().map(|(_, e)| e).collect();
        self.unacked_bytes = 0;
        self.drain_spilled(&mut entries, false, fx);
        while let Some(e) = self.pop_ready() {
            entries.push(e);
        }
        for e in &entries {
            if e.stored {
                fx.releases.push(e.msg.id());
            }
        }
        if durable {
            fx.writes.push(Write::DeleteQueueIndex { queue: self.id });
        }
        ready
    }
}

/// Spill I/O taken from a queue ([`Queue::spill_io`]), to run off its lock.
#[derive(Debug)]
pub struct SpillIo {
    queue: ShortStr,
    writes: Vec<SpillWrite>,
    reads: Vec<SpillRead>,
    released: Vec<Arc<SpillFile>>,
}

#[derive(Debug)]
struct SpillWrite {
    level: usize,
    id: u64,
    place: ChunkPlace,
    data: Arc<Vec<u8>>,
}

#[derive(Debug)]
struct SpillRead {
    level: usize,
    id: u64,
    place: ChunkPlace,
}

/// What [`SpillIo::run`] did, for [`Queue::spill_io_done`].
#[derive(Debug)]
pub struct SpillIoDone {
    writes: Vec<(usize, u64, std::io::Result<()>)>,
    reads: Vec<(usize, u64, std::io::Result<Vec<u8>>)>,
}

impl SpillIo {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.reads.is_empty() && self.released.is_empty()
    }

    /// Does the I/O (blocking: call it on a blocking thread): writes the
    /// new chunks, reads the asked-for ones, closes the released files.
    pub fn run(self) -> SpillIoDone {
        let _span = tracing::debug_span!("spill_io", queue = %self.queue).entered();
        let writes = self
            .writes
            .into_iter()
            .map(|w| {
                let r = w.place.file.write_at(&w.data, w.place.off);
                (w.level, w.id, r)
            })
            .collect();
        let reads = self
            .reads
            .into_iter()
            .map(|r| {
                (
                    r.level,
                    r.id,
                    r.place.file.read_at(r.place.off, r.place.len),
                )
            })
            .collect();
        drop(self.released);
        SpillIoDone { writes, reads }
    }
}

/// A spilled chunk of removed (purged or deleted) entries still on disk:
/// its entries owe the store their index deletions and body releases.
#[derive(Debug)]
pub struct SpilledRemoval {
    queue: u64,
    delete_index: bool,
    place: ChunkPlace,
}

impl SpilledRemoval {
    /// Reads the chunk (blocking: call it on a blocking thread) and returns
    /// the writes and the releases its entries owe, as
    /// [`Queue::purge`] would have made them.
    pub fn run(self) -> std::io::Result<(Vec<Write>, Vec<MessageId>)> {
        let data = self.place.file.read_at(self.place.off, self.place.len)?;
        let mut writes = Vec::new();
        let mut releases = Vec::new();
        for e in data
            .chunks_exact(SPILLED_ENTRY_LEN)
            .filter_map(Entry::decode_spilled)
        {
            if e.indexed && self.delete_index {
                writes.push(Write::DeleteIndex {
                    queue: self.queue,
                    seq: e.seq,
                });
            }
            if e.stored {
                releases.push(e.msg.id());
            }
        }
        Ok((writes, releases))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::QueueArgs;
    use amqp_codec::{BasicProperties, ContentHeader, FieldValue, class_id};
    use bytes::Bytes;

    fn msg(id: u64, body: &'static str, props: BasicProperties) -> Arc<Message> {
        Message::new(
            MessageId(id),
            ShortStr::from_static("ex"),
            ShortStr::from_static("rk"),
            ContentHeader {
                class_id: class_id::BASIC,
                weight: 0,
                body_size: body.len() as u64,
                properties: props.to_raw().unwrap(),
            },
            Bytes::from_static(body.as_bytes()),
        )
    }

    fn plain(id: u64) -> Arc<Message> {
        msg(id, "body", BasicProperties::default())
    }

    fn persistent(id: u64) -> Arc<Message> {
        msg(
            id,
            "body",
            BasicProperties {
                delivery_mode: Some(2),
                ..Default::default()
            },
        )
    }

    fn queue(args: &[(&'static str, FieldValue)]) -> Queue {
        let table: FieldTable = args
            .iter()
            .map(|(k, v)| (ShortStr::from_static(k), v.clone()))
            .collect();
        let parsed = QueueArgs::parse(&table, "q", "/").unwrap();
        Queue::new(1, ShortStr::from_static("q"), false, parsed, table, 0)
    }

    /// Delivers everything, running the spill I/O the queue asks for as
    /// its owner would (between operations, not under them).
    fn ids(q: &mut Queue, now: u64) -> Vec<u64> {
        let mut fx = Effects::default();
        let mut out = Vec::new();
        loop {
            if q.take_spill_io_wanted() {
                let io = q.spill_io();
                q.spill_io_done(io.run());
            }
            match q.deliver(now, false, &mut fx) {
                Some(d) => out.push(d.message.id().0),
                None if q.take_spill_io_wanted() => {
                    let io = q.spill_io();
                    q.spill_io_done(io.run());
                }
                None => return out,
            }
        }
    }

    #[test]
    fn fifo_and_requeue_to_original_position() {
        let mut q = queue(&[]);
        let mut fx = Effects::default();
        for i in 1..=5 {
            q.publish(&plain(i), 0, &mut fx);
        }
        let d: Vec<Delivery> = (0..5)
            .map(|_| q.deliver(0, true, &mut fx).unwrap())
            .collect();
        assert_eq!(q.unacked_count(), 5);
        assert!(q.requeue(d[3].seq, &mut fx));
        assert!(q.requeue(d[1].seq, &mut fx));
        assert!(q.ack(d[0].seq, &mut fx));
        assert!(!q.ack(d[0].seq, &mut fx), "double ack is refused");
        let again = q.deliver(0, true, &mut fx).unwrap();
        assert_eq!(
            (
                again.message.id().0,
                again.redelivered,
                again.delivery_count
            ),
            (2, true, 1)
        );
        assert_eq!(q.deliver(0, true, &mut fx).unwrap().message.id().0, 4);
        assert!(q.deliver(0, true, &mut fx).is_none());
    }

    #[test]
    fn ttl_expires_at_the_head_and_dead_letters() {
        let mut q = queue(&[
            ("x-message-ttl", FieldValue::I32(1000)),
            ("x-dead-letter-exchange", "dlx".into()),
        ]);
        let mut fx = Effects::default();
        q.publish(&plain(1), 0, &mut fx);
        q.publish(
            &msg(
                2,
                "b",
                BasicProperties {
                    expiration: Some(ShortStr::from_static("10")),
                    ..Default::default()
                },
            ),
            500,
            &mut fx,
        );
        assert_eq!(q.next_expiry(), Some(1001));
        q.expire(1000, &mut fx);
        assert_eq!(
            q.ready_count(),
            2,
            "nothing expired yet: 2 waits behind 1 (head-only expiry)"
        );
        q.expire(1001, &mut fx);
        assert_eq!(
            q.ready_count(),
            0,
            "1 expired, then 2 (expired at 510) reached the head"
        );
        assert_eq!(fx.dead_letters.len(), 2);
        assert!(
            fx.dead_letters
                .iter()
                .all(|d| d.reason == DeadLetterReason::Expired)
        );
        assert_eq!(fx.dead_letters[0].exchange, "dlx");
    }

    #[test]
    fn per_message_ttl_lower_than_queue_ttl_wins() {
        let mut q = queue(&[("x-message-ttl", FieldValue::I32(60_000))]);
        let mut fx = Effects::default();
        q.publish(
            &msg(
                1,
                "a",
                BasicProperties {
                    expiration: Some(ShortStr::from_static("5")),
                    ..Default::default()
                },
            ),
            100,
            &mut fx,
        );
        assert_eq!(q.next_expiry(), Some(106));
        assert!(q.deliver(106, true, &mut fx).is_none());
        assert_eq!(fx.discarded, [DeadLetterReason::Expired]);
    }

    #[test]
    fn max_length_drop_head_dead_letters_the_oldest() {
        let mut q = queue(&[
            ("x-max-length", FieldValue::I32(2)),
            ("x-dead-letter-exchange", "dlx".into()),
        ]);
        let mut fx = Effects::default();
        for i in 1..=3 {
            assert_eq!(q.publish(&plain(i), 0, &mut fx), Enqueued::Accepted);
        }
        assert_eq!(fx.dead_letters.len(), 1);
        assert_eq!(fx.dead_letters[0].message.id().0, 1);
        assert_eq!(fx.dead_letters[0].reason, DeadLetterReason::MaxLen);
        assert_eq!(ids(&mut q, 0), [2, 3]);
    }

    #[test]
    fn max_length_bytes_and_reject_publish() {
        let mut q = queue(&[
            ("x-max-length-bytes", FieldValue::I32(8)),
            ("x-overflow", "reject-publish".into()),
        ]);
        let mut fx = Effects::default();
        assert_eq!(q.publish(&plain(1), 0, &mut fx), Enqueued::Accepted);
        assert_eq!(q.publish(&plain(2), 0, &mut fx), Enqueued::Accepted);
        assert_eq!(q.publish(&plain(3), 0, &mut fx), Enqueued::Rejected);
        assert!(fx.dead_letters.is_empty());
        let mut q = queue(&[
            ("x-max-length", FieldValue::I32(0)),
            ("x-overflow", "reject-publish-dlx".into()),
            ("x-dead-letter-exchange", "dlx".into()),
        ]);
        assert_eq!(q.publish(&plain(4), 0, &mut fx), Enqueued::Rejected);
        assert_eq!(fx.dead_letters.len(), 1);
    }

    #[test]
    fn priorities_deliver_highest_first_fifo_within() {
        let mut q = queue(&[("x-max-priority", FieldValue::I32(5))]);
        let mut fx = Effects::default();
        for (id, p) in [
            (1, Some(0)),
            (2, Some(3)),
            (3, Some(5)),
            (4, Some(9)),
            (5, None),
            (6, Some(3)),
        ] {
            q.publish(
                &msg(
                    id,
                    "x",
                    BasicProperties {
                        priority: p,
                        ..Default::default()
                    },
                ),
                0,
                &mut fx,
            );
        }
        assert_eq!(ids(&mut q, 0), [3, 4, 2, 6, 1, 5]);
    }

    #[test]
    fn delivery_limit_dead_letters_after_too_many_returns() {
        let mut q = queue(&[
            ("x-delivery-limit", FieldValue::I32(1)),
            ("x-dead-letter-exchange", "dlx".into()),
        ]);
        let mut fx = Effects::default();
        q.publish(&plain(1), 0, &mut fx);
        let d = q.deliver(0, true, &mut fx).unwrap();
        q.requeue(d.seq, &mut fx);
        let d = q.deliver(0, true, &mut fx).unwrap();
        assert_eq!(d.delivery_count, 1);
        q.requeue(d.seq, &mut fx);
        assert_eq!(q.ready_count(), 0);
        assert_eq!(fx.dead_letters[0].reason, DeadLetterReason::DeliveryLimit);
    }

    #[test]
    fn reject_dead_letters_and_purge_does_not() {
        let mut q = queue(&[("x-dead-letter-exchange", "dlx".into())]);
        let mut fx = Effects::default();
        q.publish(&plain(1), 0, &mut fx);
        q.publish(&plain(2), 0, &mut fx);
        let d = q.deliver(0, true, &mut fx).unwrap();
        assert!(q.reject(d.seq, &mut fx));
        assert_eq!(fx.dead_letters[0].reason, DeadLetterReason::Rejected);
        assert_eq!(q.purge(&mut fx), 1);
        assert_eq!(fx.dead_letters.len(), 1);
    }

    #[test]
    fn durable_persistent_messages_are_written_and_removed() {
        let table = FieldTable::new();
        let mut q = Queue::new(
            7,
            ShortStr::from_static("d"),
            true,
            QueueArgs::default(),
            table,
            0,
        );
        let mut fx = Effects::default();
        q.publish(&persistent(1), 0, &mut fx);
        q.publish(&plain(2), 0, &mut fx);
        assert!(matches!(
            fx.writes[..],
            [
                Write::PutMessage(_),
                Write::PutIndex {
                    queue: 7,
                    seq: 1,
                    ..
                }
            ]
        ));
        fx.clear();
        let d = q.deliver(0, true, &mut fx).unwrap();
        q.ack(d.seq, &mut fx);
        assert!(matches!(
            fx.writes[..],
            [Write::DeleteIndex { queue: 7, seq: 1 }]
        ));
        assert_eq!(fx.releases, [MessageId(1)]);
        fx.clear();
        let d = q.deliver(0, true, &mut fx).unwrap();
        q.ack(d.seq, &mut fx);
        assert!(fx.is_empty(), "transient messages never touch the store");
    }

    #[test]
    fn bodies_past_the_memory_budget_are_paged() {
        let mut q = queue(&[]);
        q.set_memory_budget(8);
        let mut fx = Effects::default();
        for i in 1..=3 {
            q.publish(&plain(i), 0, &mut fx);
        }
        assert_eq!(q.loaded_bytes(), 8);
        assert!(matches!(fx.writes[..], [Write::PutMessage(ref m)] if m.id == MessageId(3)));
        let paged: Vec<bool> = (0..3)
            .map(|_| {
                matches!(
                    q.deliver(0, false, &mut fx).unwrap().message,
                    MessageRef::Paged(_)
                )
            })
            .collect();
        assert_eq!(paged, [false, false, true]);
        assert_eq!(fx.releases, [MessageId(3)]);
        assert_eq!(q.loaded_bytes(), 0);
    }

    #[test]
    fn a_paged_head_is_reported_and_takes_its_body_back() {
        let mut q = queue(&[]);
        q.set_memory_budget(8);
        let mut fx = Effects::default();
        for i in 1..=4 {
            q.publish(&plain(i), 0, &mut fx);
        }
        assert!(q.paged_head().is_none(), "message 1 is in memory");
        assert!(q.has_paged());
        assert_eq!(
            q.paged_heads(10, 10, u64::MAX),
            [MessageId(3), MessageId(4)]
        );
        assert_eq!(
            q.paged_heads(10, 1, u64::MAX),
            [MessageId(3)],
            "at most max_count"
        );
        assert_eq!(q.paged_heads(10, 10, 1), [MessageId(3)], "up to max_bytes");
        q.deliver(0, false, &mut fx);
        q.deliver(0, false, &mut fx);
        assert_eq!(q.paged_head(), Some(MessageId(3)));
        assert_eq!(
            q.page_in(vec![plain(3), plain(4), plain(9)], 10),
            2,
            "9 is not here"
        );
        assert!(q.paged_head().is_none());
        assert!(!q.has_paged());
        assert!(q.paged_heads(10, 10, u64::MAX).is_empty());
        for id in [3, 4] {
            match q.deliver(0, false, &mut fx).expect("a message").message {
                MessageRef::Loaded(m) => assert_eq!(m.id, MessageId(id)),
                MessageRef::Paged(_) => panic!("still paged"),
            }
        }
        assert_eq!(
            q.loaded_bytes(),
            0,
            "its memory is accounted and given back"
        );
    }

    #[test]
    fn recovered_messages_after_a_crash_are_redelivered() {
        let entries = vec![
            (
                5,
                IndexEntry {
                    message: MessageId(1),
                    size: 4,
                    ..Default::default()
                },
            ),
            (
                9,
                IndexEntry {
                    message: MessageId(2),
                    size: 4,
                    delivered: true,
                    delivery_count: 1,
                    ..Default::default()
                },
            ),
        ];
        let mut q = Queue::recover(
            3,
            ShortStr::from_static("d"),
            QueueArgs::default(),
            FieldTable::new(),
            entries.clone(),
            true,
            0,
        );
        let mut fx = Effects::default();
        let a = q.deliver(0, true, &mut fx).unwrap();
        let b = q.deliver(0, true, &mut fx).unwrap();
        assert_eq!((a.redelivered, b.redelivered), (false, true));
        let mut fx2 = Effects::default();
        q.publish(&persistent(3), 0, &mut fx2);
        assert!(
            matches!(fx2.writes[..], [_, Write::PutIndex { seq: 10, .. }]),
            "sequence continues"
        );
        let mut crashed = Queue::recover(
            3,
            ShortStr::from_static("d"),
            QueueArgs::default(),
            FieldTable::new(),
            entries,
            false,
            0,
        );
        assert!(crashed.deliver(0, true, &mut fx).unwrap().redelivered);
    }

    #[test]
    fn a_lower_length_limit_drops_the_oldest_at_once() {
        let mut q = queue(&[]);
        let mut fx = Effects::default();
        for i in 1..=5 {
            q.publish(&plain(i), 0, &mut fx);
        }
        let args = QueueArgs::parse(
            &[(ShortStr::from_static("x-max-length"), FieldValue::I64(2))]
                .into_iter()
                .collect(),
            "q",
            "/",
        )
        .unwrap();
        q.set_effective_args(args, &mut fx);
        assert_eq!(ids(&mut q, 0), vec![4, 5]);
        assert_eq!(fx.discarded.len(), 3);
        assert_eq!(q.args().max_length, Some(2));
    }

    #[test]
    fn unused_deadline_follows_x_expires() {
        let mut q = queue(&[("x-expires", FieldValue::I32(1000))]);
        assert_eq!(q.unused_deadline(), Some(1000));
        q.touch(500);
        assert_eq!(q.unused_deadline(), Some(1500));
        assert_eq!(queue(&[]).unused_deadline(), None);
    }

    fn spilling(q: &mut Queue, dir: &std::path::Path) {
        q.set_spill_window(3, 2);
        q.set_spill_dir(Some(Arc::from(dir)));
    }

    #[test]
    fn entries_behind_the_window_spill_and_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = queue(&[("x-max-priority", FieldValue::I32(2))]);
        spilling(&mut q, dir.path());
        let mut fx = Effects::default();
        for id in 1..=20 {
            let priority = Some((id % 3) as u8);
            q.publish(
                &msg(
                    id,
                    "x",
                    BasicProperties {
                        priority,
                        ..Default::default()
                    },
                ),
                0,
                &mut fx,
            );
        }
        assert!(q.spilled_count() > 0);
        assert_eq!(q.ready_count(), 20);
        // Spilling paged the bodies out: their writes are in the effects.
        let paged = fx
            .writes
            .iter()
            .filter(|w| matches!(w, Write::PutMessage(_)))
            .count() as u64;
        assert_eq!(paged, q.spilled_count());
        let first = q.deliver(0, true, &mut fx).unwrap();
        assert_eq!(first.message.id().0, 2, "highest priority first");
        assert!(q.requeue(first.seq, &mut fx));
        let order: Vec<u64> = ids(&mut q, 0);
        let expected: Vec<u64> = [2, 1, 0]
            .iter()
            .flat_map(|p| (1..=20).filter(move |id| id % 3 == *p))
            .collect();
        assert_eq!(order, expected);
        assert_eq!(q.spilled_count(), 0);
        assert_eq!(q.loaded_bytes(), 0);
    }

    #[test]
    fn purging_a_spilled_queue_releases_every_stored_body() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = queue(&[]);
        spilling(&mut q, dir.path());
        let mut fx = Effects::default();
        for id in 1..=50 {
            q.publish(&plain(id), 0, &mut fx);
        }
        let stored = fx
            .writes
            .iter()
            .filter(|w| matches!(w, Write::PutMessage(_)))
            .count();
        assert!(stored > 0);
        assert_eq!(q.purge(&mut fx), 50);
        assert_eq!(fx.releases.len(), stored);
        assert_eq!((q.ready_count(), q.spilled_count()), (0, 0));
    }

    #[test]
    fn a_recovered_queue_spills_past_its_window() {
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<(u64, IndexEntry)> = (1..=30)
            .map(|seq| {
                (
                    seq,
                    IndexEntry {
                        message: MessageId(seq),
                        size: 4,
                        ..Default::default()
                    },
                )
            })
            .collect();
        let mut q = Queue::recover(
            3,
            ShortStr::from_static("d"),
            QueueArgs::default(),
            FieldTable::new(),
            entries,
            true,
            0,
        );
        spilling(&mut q, dir.path());
        assert_eq!(q.spilled_count(), 27);
        assert_eq!(ids(&mut q, 0), (1..=30).collect::<Vec<_>>());
    }

    /// Publishes `n` plain messages to a spilling queue and writes its
    /// chunks out, as its housekeeping task would.
    fn spilled_to_disk(dir: &std::path::Path, n: u64) -> (Queue, Effects) {
        let mut q = queue(&[]);
        spilling(&mut q, dir);
        let mut fx = Effects::default();
        for id in 1..=n {
            q.publish(&plain(id), 0, &mut fx);
        }
        assert!(q.take_spill_io_wanted(), "new chunks ask to be written");
        let io = q.spill_io();
        assert!(!io.is_empty());
        q.spill_io_done(io.run());
        (q, fx)
    }

    #[test]
    fn a_head_waits_for_its_next_chunk_to_be_read_off_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let (mut q, mut fx) = spilled_to_disk(dir.path(), 20);
        // The head drains without the chunk behind it being read here.
        let mut got = Vec::new();
        while let Some(d) = q.deliver(0, false, &mut fx) {
            got.push(d.message.id().0);
        }
        assert_eq!(got, vec![1, 2, 3], "the window, then a stall");
        assert_eq!(q.ready_count(), 17);
        assert!(
            q.take_spill_io_wanted(),
            "the stalled level asks for a read"
        );
        let io = q.spill_io();
        q.spill_io_done(io.run());
        got.extend(ids(&mut q, 0));
        assert_eq!(got, (1..=20).collect::<Vec<_>>());
        assert_eq!(q.spilled_count(), 0);
    }

    #[test]
    fn purging_hands_chunks_on_disk_to_the_caller_with_what_they_owe() {
        let dir = tempfile::tempdir().unwrap();
        let (mut q, fx) = spilled_to_disk(dir.path(), 50);
        let stored = fx
            .writes
            .iter()
            .filter(|w| matches!(w, Write::PutMessage(_)))
            .count();
        let mut fx = Effects::default();
        assert_eq!(q.purge(&mut fx), 50);
        assert_eq!(
            (q.ready_count(), q.spilled_count(), q.ready_bytes()),
            (0, 0, 0)
        );
        assert!(!fx.spilled_removals.is_empty());
        let mut releases = fx.releases.clone();
        for removal in std::mem::take(&mut fx.spilled_removals) {
            let (writes, ids) = removal.run().unwrap();
            assert!(writes.is_empty(), "a transient queue has no index");
            releases.extend(ids);
        }
        assert_eq!(releases.len(), stored, "every stored body is released once");
        releases.sort_unstable();
        releases.dedup();
        assert_eq!(releases.len(), stored);
    }

    #[test]
    fn expiration_property_parsing() {
        assert_eq!(parse_expiration("60000"), Some(60000));
        assert_eq!(parse_expiration("0"), Some(0));
        assert_eq!(parse_expiration("-1"), None);
        assert_eq!(parse_expiration("1.5"), None);
        assert_eq!(parse_expiration(""), None);
        assert_eq!(parse_expiration("18446744073709551615"), None);
        assert_eq!(parse_expiration("315360000001"), None);
    }
}
