//! [`SegmentLogStorage`]: the [`Storage`] engine. Definitions and metadata are
//! small sled trees; messages and queue indexes are an append-only log of
//! segment files next to them (`log/`, see [`crate::segment_file`]), so a
//! batch of thousands of publishes and acks costs a few file writes, and what
//! was written is held by the page cache, not by the broker.
//!
//! | where | key | value |
//! |---|---|---|
//! | sled tree `meta` | `schema` | schema version |
//! | sled tree `meta` | `node-tag` | the store's node tag, the top 16 bits of its message ids ([`crate::Store::node_tag`]) |
//! | `clean-shutdown` | | written at a clean shutdown, removed at open: next segment number, definitions' count and CRC |
//! | `warren-store` | | marks the directory as a store (an empty sled next to it is damage) |
//! | `log/removed` | | the segments the log removed on purpose ([`crate::removal_journal`]) |
//! | sled tree `definitions` | kind octet ‖ name | a field table (see [`crate::definitions`]) |
//! | `log/<segment>.seg` | segment number | records, back to back |
//!
//! A record is a tag octet and its fields (integers big-endian):
//!
//! | tag | record | fields |
//! |---|---|---|
//! | 1 | put message | id u64, length u32, [`Message::encode`] |
//! | 2 | delete message | id u64 |
//! | 3 | put index entry | queue u64, seq u64, [`IndexEntry`] (26 octets) |
//! | 4 | delete index entry | queue u64, seq u64 |
//! | 5 | delete a queue's index | queue u64 |
//!
//! Replaying the segments in key order rebuilds every stored message and index
//! entry: a later put of the same key supersedes an earlier one, a delete
//! removes it.
//!
//! ## Reclaiming space
//!
//! Each segment counts its **live** records (puts that nothing later superseded
//! or deleted) and its **pending** ones (deletes and superseding puts whose
//! victim sits in an older segment that still exists). A segment with neither
//! is removed: replay needs nothing from it. Removing it releases the records
//! of newer segments that pointed into it, which may free those in turn.
//! A removal waits until the records that made the segment unneeded are
//! synced, and a removal made possible by another waits one sync longer (see
//! [`crate::segment_file`]), so a crash can never keep a delete's segment gone
//! while the put it cancels comes back.
//!
//! A segment that keeps a few long-lived records would pin every segment that
//! deleted something from it, so once its live bytes fall below a quarter of
//! its size (and it is not among the newest) its live records are copied to
//! the head of the log (compaction) and it goes.
//!
//! In memory the engine keeps where each stored message and index entry is
//! (for reads and for the counts above) and the per-segment counts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;

use amqp_codec::FieldTable;
use bytes::{BufMut, Bytes, BytesMut};

use crate::damage::{Damage, Quarantine, RepairReport};
use crate::definitions::DefKind;
use crate::error::StoreError;
use rustc_hash::FxHashMap;

use crate::index_runs::QueueIndex;
use crate::message::{Message, MessageId};
use crate::segment_file::{LogOpen, MAX_UNSYNCED_FILES, SegmentFiles};
use crate::storage::{IndexEntry, MessageCensus, SCHEMA_VERSION, Storage, Write};

/// How long [`SegmentLogStorage::open`] waits for a data directory that a store of
/// this process still holds.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// A segment is closed once it holds this many octets (a batch larger than
/// this spans several segments, all synced together).
const SEGMENT_TARGET: usize = 256 * 1024;

/// A segment something cancelled a record in this recently (counted in
/// segments) is not compacted: it is being consumed and will likely empty by
/// itself.
const COMPACT_MIN_AGE: u64 = 16;

/// How long written segments wait for a sync when no commit asks for one
/// (until then each holds an open file, and removals wait).
const MAX_UNSYNCED_AGE: std::time::Duration = std::time::Duration::from_millis(500);

/// What a pinned, stripped newer segment is assumed to cost when deciding
/// whether to compact the segment pinning it (octets).
const PINNED_SEGMENT_COST: u64 = 256;

const TAG_PUT_MESSAGE: u8 = 1;
const TAG_DELETE_MESSAGE: u8 = 2;
const TAG_PUT_INDEX: u8 = 3;
const TAG_DELETE_INDEX: u8 = 4;
const TAG_DELETE_QUEUE_INDEX: u8 = 5;

/// A stored message body, packed into one word (the map of stored messages
/// is the engine's only per-message memory, so it is kept to 8 octets): the
/// segment holding its record (40 bits), where that record starts in the
/// segment's file in 8-octet units (16 bits: the first 512 KiB of a file;
/// past that, or unknown, the record is found through its segment), and how
/// many queue entries reference it (8 bits; from 255 on, the count is kept
/// in [`LogState::many_refs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Body(u64);

impl Body {
    const REF_BITS: u32 = 8;
    const AT_BITS: u32 = 16;
    /// The reference count is in `LogState::many_refs`.
    const REFS_ELSEWHERE: u64 = (1 << Self::REF_BITS) - 1;
    const AT_UNKNOWN: u64 = (1 << Self::AT_BITS) - 1;
    /// Record offsets are kept in units of this many octets.
    const AT_UNIT: u64 = 8;

    /// `encoding_at` is the file offset of the record's encoding (after its
    /// header), `u64::MAX` if not known.
    fn new(seg: u64, encoding_at: u64, refs_field: u64) -> Body {
        let at = encoding_at
            .checked_sub(RECORD_HEADER as u64)
            .map_or(Self::AT_UNKNOWN, |h| {
                (h / Self::AT_UNIT).min(Self::AT_UNKNOWN)
            });
        Body(
            seg << (Self::AT_BITS + Self::REF_BITS)
                | at << Self::REF_BITS
                | refs_field.min(Self::REFS_ELSEWHERE),
        )
    }

    fn seg(self) -> u64 {
        self.0 >> (Self::AT_BITS + Self::REF_BITS)
    }

    /// The reference count as packed (`REFS_ELSEWHERE`: see `many_refs`).
    fn refs_field(self) -> u64 {
        self.0 & Self::REFS_ELSEWHERE
    }

    fn with_refs_field(self, refs: u64) -> Body {
        Body(self.0 & !Self::REFS_ELSEWHERE | refs.min(Self::REFS_ELSEWHERE))
    }

    /// The 8-aligned file offset at or at most 7 octets before the start of
    /// the body's record, if known.
    fn record_near(self) -> Option<u64> {
        let at = (self.0 >> Self::REF_BITS) & Self::AT_UNKNOWN;
        (at != Self::AT_UNKNOWN).then_some(at * Self::AT_UNIT)
    }
}

/// A put-message record's header: tag, id, encoding length.
const RECORD_HEADER: usize = 13;

/// Where the header of `id`'s put-message record is in `window` (read at
/// its body's `record_near` offset): the one position among the first
/// [`Body::AT_UNIT`] whose tag and id name it, and the encoding's length.
/// `None` if none or more than one does (the segment changed since, or a
/// body's bytes look like the header): then the segment is read instead.
fn find_put_record(window: &[u8], id: MessageId) -> Option<(usize, usize)> {
    let id = id.0.to_be_bytes();
    let mut found = None;
    for p in 0..Body::AT_UNIT as usize {
        let Some(header) = window.get(p..p + RECORD_HEADER) else {
            break;
        };
        if header[0] == TAG_PUT_MESSAGE && header[1..9] == id {
            if found.is_some() {
                return None;
            }
            let mut len = [0u8; 4];
            len.copy_from_slice(&header[9..13]);
            found = Some((p, u32::from_be_bytes(len) as usize));
        }
    }
    found
}

/// The file offset of `off` in a segment's data, given where each frame's
/// data starts (see `SegmentFiles::read_with_layout`); `u64::MAX` if it is
/// not in any frame.
fn file_offset(layout: &[(usize, u64)], off: usize) -> u64 {
    let i = layout.partition_point(|&(data, _)| data <= off);
    match i.checked_sub(1).and_then(|i| layout.get(i)) {
        Some(&(data, file)) => file + (off - data) as u64,
        None => u64::MAX,
    }
}

/// A segment's bookkeeping.
#[derive(Debug, Default)]
struct Segment {
    /// Octets in the segment.
    size: u32,
    /// Put records in it, and how many of them are live.
    records: u32,
    live: u32,
    /// Records here that cancel a record in an older, still present segment.
    pending: u32,
    /// Newer segments holding records that cancel records here, with counts.
    cancelled_by: HashMap<u64, u32>,
    /// Holds only deletes (see [`SegmentLogStorage::strip`]).
    stripped: bool,
    /// The newest segment that cancelled a record here (its own number at
    /// first): a segment still being consumed is not compacted.
    touched: u64,
    /// The sync its removal must wait for at least: one after the removal of
    /// an older segment it cancelled records in (0: none).
    unlink_after: u64,
}

impl Segment {
    /// Live octets, estimated from the share of live records.
    fn live_bytes(&self) -> u64 {
        u64::from(self.size) * u64::from(self.live) / u64::from(self.records.max(1))
    }
}

/// Everything the engine knows about the log.
#[derive(Debug, Default)]
struct LogState {
    next_seg: u64,
    /// Stored message bodies.
    messages: FxHashMap<MessageId, Body>,
    /// Reference counts of 255 and more (a message routed to that many
    /// queues), which do not fit in a body's word.
    many_refs: FxHashMap<MessageId, u64>,
    /// Where each queue's index-entry records are.
    index: FxHashMap<u64, QueueIndex>,
    segs: BTreeMap<u64, Segment>,
    /// Segments worth compacting (see [`LogState::classify`]).
    sparse: BTreeSet<u64>,
    /// The segment being filled (not in `segs` until it is sealed).
    open: Option<Builder>,
}

/// Each queue's live index entries found by replay, in sequence order.
type RecoveredIndex = FxHashMap<u64, Vec<(u64, IndexEntry)>>;

/// The segment being filled: each batch appends a frame to its file.
#[derive(Debug)]
struct Builder {
    seg: u64,
    /// This batch's records, not yet appended.
    buf: BytesMut,
    /// Where `buf` will start in the segment's file once appended as a
    /// frame (a new file's header, then the frames before it).
    file_pos: u64,
    /// Octets appended to the file so far.
    size: u32,
    live: u32,
    /// Put records written (live or not).
    puts: u32,
    /// Older segments this one cancels records in, with counts.
    cancels: HashMap<u64, u32>,
}

impl Builder {
    fn new(seg: u64) -> Builder {
        Builder {
            seg,
            buf: BytesMut::new(),
            file_pos: (crate::segment_file::HEADER + crate::segment_file::FRAME_HEADER) as u64,
            size: 0,
            live: 0,
            puts: 0,
            cancels: HashMap::new(),
        }
    }
}

impl LogState {
    /// `n` records in segment `seg` are superseded or deleted by records of
    /// the segment being built.
    fn kill(&mut self, b: &mut Builder, seg: u64, n: u32) {
        if seg == b.seg {
            b.live -= n;
            return;
        }
        if let Some(s) = self.segs.get_mut(&seg) {
            s.live = s.live.saturating_sub(n);
            s.touched = b.seg;
            *b.cancels.entry(seg).or_insert(0) += n;
            self.classify(seg);
        }
    }

    /// Keeps [`LogState::sparse`] up to date for `seg`: a segment with live
    /// records is worth compacting once what keeping it costs (its dead octets,
    /// plus an estimate for each newer segment it pins) exceeds its live octets.
    fn classify(&mut self, seg: u64) {
        let Some(s) = self.segs.get(&seg) else {
            self.sparse.remove(&seg);
            return;
        };
        let live = s.live_bytes();
        let cost = u64::from(s.size).saturating_sub(live)
            + PINNED_SEGMENT_COST * s.cancelled_by.len() as u64;
        if s.live > 0 && cost > live {
            self.sparse.insert(seg);
        } else {
            self.sparse.remove(&seg);
        }
    }

    /// A queue entry takes a reference on a message: true if its body is
    /// already stored (then no record is written).
    fn add_ref(&mut self, id: MessageId) -> bool {
        let Some(body) = self.messages.get_mut(&id) else {
            return false;
        };
        let field = body.refs_field();
        if field + 1 < Body::REFS_ELSEWHERE {
            *body = body.with_refs_field(field + 1);
            return true;
        }
        // From 255 on, the count is kept aside.
        let refs = match field {
            Body::REFS_ELSEWHERE => self.many_refs.get(&id).copied().unwrap_or(0),
            refs => refs,
        };
        *body = body.with_refs_field(Body::REFS_ELSEWHERE);
        self.many_refs.insert(id, refs + 1);
        true
    }

    /// How many queue entries reference a stored message.
    fn refs(&self, id: MessageId) -> Option<u64> {
        let body = self.messages.get(&id)?;
        Some(match body.refs_field() {
            Body::REFS_ELSEWHERE => self.many_refs.get(&id).copied().unwrap_or(0),
            refs => refs,
        })
    }

    /// A message record was written to the segment being built, holding
    /// `refs` references (a put supersedes an earlier record of the id: replay
    /// and compaction).
    /// `at` is the file offset of its encoding (`u64::MAX`: not known).
    fn place_message(&mut self, b: &mut Builder, id: MessageId, refs: u64, at: u64) {
        b.puts += 1;
        b.live += 1;
        let old = self.messages.insert(id, Body::new(b.seg, at, refs));
        if refs >= Body::REFS_ELSEWHERE {
            self.many_refs.insert(id, refs);
        } else if old.is_some_and(|o| o.refs_field() == Body::REFS_ELSEWHERE) {
            self.many_refs.remove(&id);
        }
        if let Some(old) = old {
            self.kill(b, old.seg(), 1);
        }
    }

    /// A queue entry drops its reference on a message: true if that was the
    /// last (or it had none: an orphan), so its delete record must be written.
    fn drop_ref(&mut self, id: MessageId) -> bool {
        let Some(body) = self.messages.get_mut(&id) else {
            return false;
        };
        let refs = match body.refs_field() {
            Body::REFS_ELSEWHERE => self.many_refs.get(&id).copied().unwrap_or(0),
            refs => refs,
        };
        if refs <= 1 {
            return true;
        }
        if refs - 1 < Body::REFS_ELSEWHERE {
            *body = body.with_refs_field(refs - 1);
            if refs == Body::REFS_ELSEWHERE {
                self.many_refs.remove(&id);
            }
        } else {
            self.many_refs.insert(id, refs - 1);
        }
        false
    }

    /// A message's delete record was written.
    fn remove_message(&mut self, b: &mut Builder, id: MessageId) {
        if !self.many_refs.is_empty() {
            self.many_refs.remove(&id);
        }
        if let Some(old) = self.messages.remove(&id) {
            self.kill(b, old.seg(), 1);
        }
    }

    fn put_index(&mut self, b: &mut Builder, queue: u64, seq: u64) {
        b.puts += 1;
        b.live += 1;
        if let Some(old) = self.index.entry(queue).or_default().put(seq, b.seg) {
            self.kill(b, old, 1);
        }
    }

    fn delete_index(&mut self, b: &mut Builder, queue: u64, seq: u64) {
        let Some(q) = self.index.get_mut(&queue) else {
            return;
        };
        let old = q.remove(seq);
        if q.is_empty() {
            self.index.remove(&queue);
        }
        if let Some(old) = old {
            self.kill(b, old, 1);
        }
    }

    fn delete_queue_index(&mut self, b: &mut Builder, queue: u64) {
        let Some(q) = self.index.remove(&queue) else {
            return;
        };
        let mut counts: BTreeMap<u64, u32> = BTreeMap::new();
        for (seg, n) in q.segments() {
            *counts.entry(seg).or_insert(0) += n;
        }
        for (seg, n) in counts {
            self.kill(b, seg, n);
        }
    }

    /// Registers a finished segment. Returns whether it is needed at all
    /// (a segment whose every record cancelled out within it is not).
    fn finish(&mut self, b: Builder, size: u32) -> bool {
        // A target removed while this segment was open (its other records
        // went) needs no cancelling any more.
        let mut pending = 0;
        for (&target, &n) in &b.cancels {
            if let Some(t) = self.segs.get_mut(&target) {
                *t.cancelled_by.entry(b.seg).or_insert(0) += n;
                pending += n;
                self.classify(target);
            }
        }
        self.segs.insert(
            b.seg,
            Segment {
                size,
                records: b.puts,
                live: b.live,
                pending,
                cancelled_by: HashMap::new(),
                stripped: b.puts == 0,
                touched: b.seg,
                unlink_after: 0,
            },
        );
        self.classify(b.seg);
        b.live > 0 || pending > 0
    }

    /// Removes every segment (among `candidates` and those they release) that
    /// nothing needs any more. Returns the removed segments, each with the
    /// sync its file's removal must wait for (`base`, the next sync, at least),
    /// and the segments still present that have no live records but are
    /// pinned (to be stripped).
    fn reclaim(
        &mut self,
        candidates: impl IntoIterator<Item = u64>,
        base: u64,
    ) -> (Vec<(u64, u64)>, Vec<u64>) {
        let mut ready = BTreeSet::new();
        let mut pinned = Vec::new();
        for seg in candidates {
            match self.segs.get(&seg) {
                Some(s) if s.live == 0 && s.pending == 0 => {
                    ready.insert(seg);
                }
                Some(s) if s.live == 0 && !s.stripped => pinned.push(seg),
                _ => {}
            }
        }
        let mut removed = Vec::new();
        while let Some(seg) = ready.pop_first() {
            let Some(s) = self.segs.remove(&seg) else {
                continue;
            };
            self.sparse.remove(&seg);
            let after = base.max(s.unlink_after);
            removed.push((seg, after));
            for (newer, n) in s.cancelled_by {
                if let Some(ns) = self.segs.get_mut(&newer) {
                    ns.pending = ns.pending.saturating_sub(n);
                    ns.unlink_after = ns.unlink_after.max(after + 1);
                    if ns.live == 0 && ns.pending == 0 {
                        ready.insert(newer);
                    }
                }
            }
        }
        pinned.retain(|s| self.segs.contains_key(s));
        (removed, pinned)
    }
}

/// The [`Storage`] engine: definitions in sled, messages and indexes in a log
/// of segment files.
pub struct SegmentLogStorage {
    db: sled::Db,
    meta: sled::Tree,
    definitions: sled::Tree,
    files: SegmentFiles,
    /// Octets after which the segment being filled is sealed.
    segment_target: std::sync::atomic::AtomicUsize,
    /// Segment numbers found at open, replayed once.
    found: Mutex<Vec<u64>>,
    last_sync: Mutex<std::time::Instant>,
    state: Mutex<LogState>,
    /// Index entries found at open, handed out once by [`Storage::index`].
    recovered: Mutex<Option<RecoveredIndex>>,
    /// The segment last read for a message (drains read runs from one segment).
    read_cache: Mutex<Option<CachedSegment>>,
    /// Held while the store is open: no other process opens the directory.
    _dir_lock: DirLock,
    /// The previous run shut down cleanly (taken once by the store).
    clean_shutdown: std::sync::atomic::AtomicBool,
    /// The data directory.
    dir: std::path::PathBuf,
}

impl std::fmt::Debug for SegmentLogStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("SegmentLogStorage")
            .field("segments", &state.segs.len())
            .field("messages", &state.messages.len())
            .field("queues", &state.index.len())
            .finish_non_exhaustive()
    }
}

/// The file whose presence says a directory holds a Warren store (so an
/// empty metadata database next to it is damage, not a first boot).
const STORE_MARKER: &str = "warren-store";

fn write_marker(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join(STORE_MARKER);
    let text = format!(
        "A Warren data directory (store schema {SCHEMA_VERSION}). Keep this file: without it an empty\nmetadata database would look like a first boot.\n"
    );
    std::fs::File::create(&path)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, text.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::File::open(dir)?.sync_all())
        .map_err(|e| StoreError::Engine(format!("cannot write {}: {e}", path.display())))
}

/// What a clean shutdown records (`<dir>/clean-shutdown`, removed at the
/// next open): the next segment number and the definitions' count and
/// CRC-32, so that open can tell a clean directory that lost a segment, or
/// whose metadata database lost definitions, from an intact one.
#[derive(Debug)]
struct CleanShutdown {
    next_segment: u64,
    definitions: u64,
    digest: u32,
}

impl CleanShutdown {
    const MAGIC: &'static [u8; 8] = b"WRNCLN01";
    const FILE: &'static str = "clean-shutdown";

    fn encode(&self) -> Vec<u8> {
        let mut v = Self::MAGIC.to_vec();
        v.extend_from_slice(&self.next_segment.to_be_bytes());
        v.extend_from_slice(&self.definitions.to_be_bytes());
        v.extend_from_slice(&self.digest.to_be_bytes());
        let crc = crc32fast::hash(&v);
        v.extend_from_slice(&crc.to_be_bytes());
        v
    }

    fn write(&self, dir: &Path) -> Result<(), StoreError> {
        let path = dir.join(Self::FILE);
        std::fs::File::create(&path)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, &self.encode())?;
                f.sync_all()
            })
            .and_then(|()| std::fs::File::open(dir)?.sync_all())
            .map_err(|e| StoreError::Engine(format!("cannot write {}: {e}", path.display())))
    }

    /// The record, if the previous run left one. A damaged record is damage.
    fn read(dir: &Path) -> Result<Option<CleanShutdown>, StoreError> {
        let path = dir.join(Self::FILE);
        let raw = match std::fs::read(&path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::Engine(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        let field = |at: usize| {
            raw.get(at..at + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
        };
        let r = (raw.len() == 32 && raw.starts_with(Self::MAGIC))
            .then(|| {
                let digest = u32::try_from(field(24)? >> 32).ok()?;
                Some(CleanShutdown {
                    next_segment: field(8)?,
                    definitions: field(16)?,
                    digest,
                })
            })
            .flatten()
            .filter(|r| r.encode() == raw);
        match r {
            Some(r) => Ok(Some(r)),
            None => Err(StoreError::Damaged(Damage::new(
                &path,
                "the clean-shutdown record is damaged",
            ))),
        }
    }

    fn remove(dir: &Path) -> Result<(), StoreError> {
        let path = dir.join(Self::FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| StoreError::Engine(format!("cannot sync {}: {e}", dir.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Engine(format!(
                "cannot remove {}: {e}",
                path.display()
            ))),
        }
    }
}

/// The number of definitions and a CRC-32 over them in key order.
fn definitions_digest(tree: &sled::Tree) -> Result<(u64, u32), StoreError> {
    let mut crc = crc32fast::Hasher::new();
    let mut n = 0u64;
    for kv in tree.iter() {
        let (k, v) = kv?;
        crc.update(&(k.len() as u64).to_be_bytes());
        crc.update(&k);
        crc.update(&(v.len() as u64).to_be_bytes());
        crc.update(&v);
        n += 1;
    }
    Ok((n, crc.finalize()))
}

/// The data directory's lock (`warren.lock`, holding the owner's pid),
/// released when dropped.
#[derive(Debug)]
struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    fn acquire(dir: &Path) -> Result<DirLock, StoreError> {
        let path = dir.join("warren.lock");
        let fail =
            |e: std::io::Error| StoreError::Engine(format!("cannot lock {}: {e}", path.display()));
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(fail)?;
            match fs4::FileExt::try_lock(&file) {
                Ok(()) => {
                    file.set_len(0).map_err(fail)?;
                    std::io::Write::write_all(
                        &mut &file,
                        format!("{}\n", std::process::id()).as_bytes(),
                    )
                    .map_err(fail)?;
                    return Ok(DirLock { _file: file });
                }
                Err(fs4::TryLockError::WouldBlock) => {
                    let pid = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|p| p.trim().parse::<u32>().ok());
                    // A store of this very process that is being dropped
                    // lets go in a moment; another process is a conflict.
                    if pid != Some(std::process::id()) || std::time::Instant::now() >= deadline {
                        return Err(StoreError::Locked {
                            dir: dir.to_path_buf(),
                            pid,
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(fs4::TryLockError::Error(e)) => return Err(fail(e)),
            }
        }
    }
}

fn def_key(kind: DefKind, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(kind as u8);
    k.extend_from_slice(key);
    k
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A segment read for paging messages in, with where each message is in it
/// (the engine keeps only each message's segment, not its offset).
struct CachedSegment {
    seg: u64,
    data: Bytes,
    messages: FxHashMap<MessageId, (u32, u32)>,
}

impl CachedSegment {
    fn parse(seg: u64, data: Bytes) -> Result<CachedSegment, StoreError> {
        let mut messages = FxHashMap::default();
        let mut r = Reader {
            buf: &data,
            pos: 0,
            seg,
        };
        while let Some(record) = r.record()? {
            if let Record::PutMessage { id, off, encoding } = record {
                // A later record of the same id supersedes.
                messages.insert(id, (off as u32, encoding.len() as u32));
            }
        }
        Ok(CachedSegment {
            seg,
            data,
            messages,
        })
    }

    /// A copy of a message's encoding (a copy, so that a paged-in message
    /// does not keep the whole segment in memory).
    fn message(&self, id: MessageId) -> Option<Bytes> {
        let &(off, len) = self.messages.get(&id)?;
        let raw = self.data.get(off as usize..off as usize + len as usize)?;
        Some(Bytes::copy_from_slice(raw))
    }
}

/// Reads big-endian integers from a segment, failing on truncation.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    seg: u64,
}

impl<'a> Reader<'a> {
    fn corrupt(&self) -> StoreError {
        StoreError::Corrupt {
            what: "log segment",
            key: format!("{} at {}", self.seg, self.pos),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let end = self.pos.checked_add(n).ok_or_else(|| self.corrupt())?;
        let s = self.buf.get(self.pos..end).ok_or_else(|| self.corrupt())?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        let mut x = [0u8; 4];
        x.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(x))
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        let mut x = [0u8; 8];
        x.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(x))
    }

    /// The next record, `None` at the end of the segment. Every pass over a
    /// segment (replay, stripping, compaction, reads) goes through here.
    fn record(&mut self) -> Result<Option<Record<'a>>, StoreError> {
        // The seal (the segment's last frame) holds no record of its own.
        while self.buf.get(self.pos) == Some(&crate::segment_file::SEAL_RECORD) {
            self.pos += 1;
        }
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        Ok(Some(match self.u8()? {
            TAG_PUT_MESSAGE => {
                let id = MessageId(self.u64()?);
                let len = self.u32()? as usize;
                let off = self.pos;
                Record::PutMessage {
                    id,
                    off,
                    encoding: self.take(len)?,
                }
            }
            TAG_DELETE_MESSAGE => Record::DeleteMessage(MessageId(self.u64()?)),
            TAG_PUT_INDEX => Record::PutIndex {
                queue: self.u64()?,
                seq: self.u64()?,
                entry: self.take(IndexEntry::LEN)?,
            },
            TAG_DELETE_INDEX => Record::DeleteIndex {
                queue: self.u64()?,
                seq: self.u64()?,
            },
            TAG_DELETE_QUEUE_INDEX => Record::DeleteQueueIndex(self.u64()?),
            _ => return Err(self.corrupt()),
        }))
    }
}

/// The records of a damaged frame's data, read as well as they can be:
/// after a record that does not parse, reading resumes at the first later
/// offset from which every record parses and the last one ends exactly at
/// the end of the data (so only the record the damage hit is skipped).
fn lenient_records(data: &[u8]) -> Vec<Record<'_>> {
    let parses_to_end = |from: usize| {
        let mut r = Reader {
            buf: data,
            pos: from,
            seg: 0,
        };
        loop {
            match r.record() {
                Ok(None) => return true,
                Ok(Some(Record::PutIndex { entry, .. })) if IndexEntry::decode(entry).is_none() => {
                    return false;
                }
                Ok(Some(_)) => {}
                Err(_) => return false,
            }
        }
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let mut r = Reader {
            buf: data,
            pos,
            seg: 0,
        };
        let mut failed_at = None;
        loop {
            let start = r.pos;
            match r.record() {
                Ok(Some(record)) => out.push(record),
                Ok(None) => break,
                Err(_) => {
                    failed_at = Some(start);
                    break;
                }
            }
        }
        let Some(start) = failed_at else {
            break;
        };
        match (start + 1..data.len()).find(|&p| parses_to_end(p)) {
            Some(p) => pos = p,
            None => break,
        }
    }
    out
}

/// One record of a segment, borrowing from its data.
enum Record<'a> {
    PutMessage {
        id: MessageId,
        /// Offset of the encoding in the segment.
        off: usize,
        /// [`Message::encode`]'s output.
        encoding: &'a [u8],
    },
    DeleteMessage(MessageId),
    PutIndex {
        queue: u64,
        seq: u64,
        /// An [`IndexEntry`]'s encoding.
        entry: &'a [u8],
    },
    DeleteIndex {
        queue: u64,
        seq: u64,
    },
    DeleteQueueIndex(u64),
}

impl SegmentLogStorage {
    /// Reads a message through its whole segment (kept as the read cache:
    /// the next bodies of a queue are usually in the same one).
    fn message_from_segment(&self, id: MessageId) -> Result<Option<Message>, StoreError> {
        // The segment is looked up under the lock and read without it, so the
        // writer may move the message (compaction) and remove its old segment
        // in between: then look again. The last attempt keeps the lock across
        // the read, so it cannot miss.
        for attempt in 0..3 {
            let state = lock(&self.state);
            let Some(seg) = state.messages.get(&id).map(|b| b.seg()) else {
                return Ok(None);
            };
            let held = (attempt == 2).then_some(state);
            let mut cache = lock(&self.read_cache);
            let cached = cache
                .as_ref()
                .filter(|c| c.seg == seg)
                .and_then(|c| c.message(id));
            let raw = match cached {
                Some(raw) => Some(raw),
                // Not read yet, or read before the message's frame was
                // appended (the segment being filled).
                None => {
                    let Some(data) = self.files.read(seg)? else {
                        continue;
                    };
                    let parsed = CachedSegment::parse(seg, data)?;
                    let raw = parsed.message(id);
                    *cache = Some(parsed);
                    raw
                }
            };
            drop(held);
            drop(cache);
            let Some(raw) = raw else {
                continue;
            };
            return Message::decode(id, raw).map(Some);
        }
        Err(StoreError::Corrupt {
            what: "message location (segment missing)",
            key: id.0.to_string(),
        })
    }

    /// Opens (or creates) the store in `dir` and replays the log. Refuses a
    /// directory another process holds, and one with damage a crash cannot
    /// explain ([`StoreError::Damaged`]).
    pub fn open(dir: &Path) -> Result<SegmentLogStorage, StoreError> {
        Self::open_with(dir, false).map(|(s, _)| s)
    }

    /// [`SegmentLogStorage::open`], or with `repair` a repair: damaged parts are
    /// moved to `<dir>/quarantine/` instead of refused, and the report says
    /// what was moved and which queue entries lost their messages.
    pub fn open_with(
        dir: &Path,
        repair: bool,
    ) -> Result<(SegmentLogStorage, RepairReport), StoreError> {
        let named = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
            StoreError::Engine(format!("{what} {}: {e}", path.display()))
        };
        if dir.exists() && !dir.is_dir() {
            return Err(named(
                "data directory",
                dir,
                &"exists and is not a directory",
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| named("cannot create data directory", dir, &e))?;
        let dir_lock = DirLock::acquire(dir)?;
        let log_dir = dir.join("log");
        let has_segments = std::fs::read_dir(&log_dir).is_ok_and(|mut entries| {
            entries.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".seg")))
        });
        let marker = dir.join(STORE_MARKER);
        let marked = marker.exists();
        let mut report = RepairReport::default();
        let mut quarantine = Quarantine::new(dir);
        let (db, meta) = Self::open_sled(dir)?;
        let schema = meta.get("schema")?;
        let (db, meta) = match schema {
            // A layout this build does not know is refused before it is replayed.
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .unwrap_or(0);
                if found != SCHEMA_VERSION {
                    return Err(StoreError::SchemaMismatch {
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
                (db, meta)
            }
            // Nothing in sled, yet the directory was a store: its metadata
            // (definitions, schema) is gone, not new.
            None if marked || has_segments => {
                let problem = format!(
                    "the metadata database holds nothing (empty, unreadable or replaced) while {}",
                    if has_segments {
                        "the message log holds segments"
                    } else {
                        "the store marker says this directory was initialised"
                    }
                );
                let db_path = dir.join("db");
                if !repair {
                    return Err(StoreError::Damaged(Damage::new(&db_path, problem)));
                }
                // Messages cannot be tied to queues without the definitions:
                // the whole store goes to quarantine and starts afresh.
                drop(meta);
                drop(db);
                let q = quarantine
                    .dir()
                    .map_err(|e| named("cannot create quarantine in", dir, &e))?
                    .to_path_buf();
                for entry in std::fs::read_dir(dir).map_err(|e| named("cannot list", dir, &e))? {
                    let entry = entry.map_err(|e| named("cannot list", dir, &e))?;
                    let name = entry.file_name();
                    let keep = ["quarantine", "warren.lock", "spill"];
                    if keep.iter().any(|k| name == *k) {
                        continue;
                    }
                    std::fs::rename(entry.path(), q.join(&name))
                        .map_err(|e| named("cannot move to quarantine", &entry.path(), &e))?;
                }
                report.actions.push(format!(
                    "{}: {problem}; the whole store (metadata and message log) moved to quarantine, the broker starts empty",
                    db_path.display()
                ));
                let (db, meta) = Self::open_sled(dir)?;
                Self::initialise(dir, &db, &meta)?;
                (db, meta)
            }
            None => {
                Self::initialise(dir, &db, &meta)?;
                (db, meta)
            }
        };
        if !marker.exists() {
            // A directory from a build without the marker.
            write_marker(dir)?;
        }
        // The clean-shutdown record is a file of the store's own, not a sled
        // key: damage in sled's files must not pass for a crash. A directory
        // from a build without it has sled's old `clean` key.
        let record = CleanShutdown::read(dir)?;
        let legacy_clean = !marked && meta.get("clean")?.is_some();
        let definitions = db.open_tree("definitions")?;
        if let Some(r) = &record {
            let (count, digest) = definitions_digest(&definitions)?;
            if (count, digest) != (r.definitions, r.digest) {
                let problem = format!(
                    "the metadata database holds {count} definitions (digest {digest:08x}) where the clean shutdown recorded {} (digest {:08x}): sled lost or changed some",
                    r.definitions, r.digest
                );
                let db_path = dir.join("db");
                if !repair {
                    return Err(StoreError::Damaged(Damage::new(&db_path, problem)));
                }
                report.actions.push(format!(
                    "{}: {problem}; kept what sled still holds (restore lost definitions from an export)",
                    db_path.display()
                ));
            }
        }
        let clean = record.is_some() || legacy_clean;
        let clean_next = record.as_ref().map(|r| r.next_segment);
        let mut damaged_frames = Vec::new();
        let (files, found, next) = SegmentFiles::open(
            &log_dir,
            LogOpen {
                clean,
                clean_next,
                journal_required: marked,
                repair,
                quarantine: &mut quarantine,
                actions: &mut report.actions,
                damaged_frames: &mut damaged_frames,
            },
        )?;
        let storage = SegmentLogStorage {
            meta,
            definitions,
            clean_shutdown: std::sync::atomic::AtomicBool::new(clean),
            files,
            segment_target: std::sync::atomic::AtomicUsize::new(SEGMENT_TARGET),
            found: Mutex::new(found),
            last_sync: Mutex::new(std::time::Instant::now()),
            db,
            state: Mutex::new(LogState::default()),
            recovered: Mutex::new(None),
            read_cache: Mutex::new(None),
            _dir_lock: dir_lock,
            dir: dir.to_path_buf(),
        };
        storage.replay(next, repair.then_some(&mut report), &damaged_frames)?;
        // Checked: from now on a crash is a crash.
        CleanShutdown::remove(dir)?;
        report.quarantine = quarantine.used().map(Path::to_path_buf);
        Ok((storage, report))
    }

    /// Opens sled's database, waiting up to 15 s for sled's own lock: the
    /// directory lock is already ours, so a held sled lock is a store of
    /// this process that was just dropped (sled's I/O threads let go of the
    /// file last, seconds later on a loaded machine).
    fn open_sled(dir: &Path) -> Result<(sled::Db, sled::Tree), StoreError> {
        let config = sled::Config::new()
            .path(dir)
            // Warren decides when to fsync (group commit); sled's own timer
            // still bounds how long acks and other unsynced writes wait.
            .flush_every_ms(Some(500))
            .cache_capacity(64 << 20);
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match config.open() {
                // sled reports a held lock as an `Other` I/O error that
                // wraps the WouldBlock; only its text tells.
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Ok(db) => break db,
                Err(e) => {
                    return Err(StoreError::Engine(format!(
                        "cannot open the metadata database in {}: {e}",
                        dir.display()
                    )));
                }
            }
        };
        let meta = db.open_tree("meta")?;
        Ok((db, meta))
    }

    /// Marks a new directory as a store: schema version (synced), then the
    /// marker file.
    fn initialise(dir: &Path, db: &sled::Db, meta: &sled::Tree) -> Result<(), StoreError> {
        meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())?;
        db.flush()?;
        write_marker(dir)
    }

    #[cfg(test)]
    fn files_dir(&self) -> std::path::PathBuf {
        self.files.dir_path()
    }

    /// Sets the size at which the segment being filled is sealed at the end
    /// of a batch (default 256 KiB; a batch is split at 256 KiB whatever the
    /// target). Tests use tiny ones so that a few records fill many segments.
    pub fn set_segment_target(&self, octets: usize) {
        self.segment_target
            .store(octets.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Log segments currently stored (an operator metric; tests use it to
    /// check that space is reclaimed).
    pub fn segments(&self) -> usize {
        let state = lock(&self.state);
        state.segs.len() + usize::from(state.open.as_ref().is_some_and(|b| b.size > 0))
    }

    /// Rebuilds the in-memory state from the log and removes segments nothing
    /// needs (left over when a crash interrupted a removal).
    ///
    /// Every live queue entry must find its message's body: one that does
    /// not lost it to damage. That refuses the open, or when repairing
    /// (`report`) the entry is dropped and listed.
    ///
    /// `damaged` holds the data of frames a repair quarantined: the queue
    /// entries they put that nothing later deleted are reported lost.
    fn replay(
        &self,
        next: u64,
        mut report: Option<&mut RepairReport>,
        damaged: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        let mut state = LogState::default();
        // Index entries deleted by a later record although no put of them
        // was found (their put was in damaged frames, or in a segment the
        // log removed since).
        let mut deleted_unseen: std::collections::HashSet<(u64, u64)> = Default::default();
        // Bodies deleted by a later record although no put of them was found.
        let mut bodies_deleted_unseen: std::collections::HashSet<MessageId> = Default::default();
        let track = report.is_some() && !damaged.is_empty();
        let found = std::mem::take(&mut *lock(&self.found));
        for seg in found {
            let Some((v, layout)) = self.files.read_with_layout(seg)? else {
                continue;
            };
            let mut b = Builder::new(seg);
            let mut r = Reader {
                buf: &v,
                pos: 0,
                seg,
            };
            while let Some(record) = r.record()? {
                match record {
                    Record::PutMessage { id, off, .. } => {
                        let at = file_offset(&layout, off);
                        state.place_message(&mut b, id, 0, at);
                    }
                    Record::DeleteMessage(id) => {
                        if track && !state.messages.contains_key(&id) {
                            bodies_deleted_unseen.insert(id);
                        }
                        state.remove_message(&mut b, id);
                    }
                    Record::PutIndex { queue, seq, entry } => {
                        IndexEntry::decode(entry).ok_or_else(|| r.corrupt())?;
                        state.put_index(&mut b, queue, seq);
                    }
                    Record::DeleteIndex { queue, seq } => {
                        if track && state.index.get(&queue).and_then(|q| q.get(seq)).is_none() {
                            deleted_unseen.insert((queue, seq));
                        }
                        state.delete_index(&mut b, queue, seq);
                    }
                    Record::DeleteQueueIndex(queue) => {
                        if track {
                            // Every entry of the queue, seen or not, is gone.
                            deleted_unseen.insert((queue, u64::MAX));
                        }
                        state.delete_queue_index(&mut b, queue);
                    }
                }
            }
            state.next_seg = seg + 1;
            state.finish(b, v.len() as u32);
        }
        // Numbers the log used before (journaled removals) are never reused.
        state.next_seg = state.next_seg.max(next);
        let all: Vec<u64> = state.segs.keys().copied().collect();
        self.settle(&mut state, all, None)?;
        // Leftovers a crash kept are removed now, one sync per wave.
        while self.files.has_unsynced() {
            self.files.sync()?;
        }
        let mut entries = self.live_index_entries(&state)?;
        let mut lost = Vec::new();
        for (&queue, list) in entries.iter_mut() {
            list.retain(|(seq, e)| {
                let found = state.messages.contains_key(&e.message);
                if !found {
                    lost.push((queue, *seq, e.message));
                }
                found
            });
        }
        // Entries the damaged frames put that are not live and that no later
        // record deleted: lost with the damage.
        if track {
            let live: std::collections::HashSet<(u64, u64)> = entries
                .iter()
                .flat_map(|(&q, list)| list.iter().map(move |(s, _)| (q, *s)))
                .collect();
            let mut damaged_bodies = std::collections::HashSet::new();
            let mut from_damage = Vec::new();
            for data in damaged {
                for record in lenient_records(data) {
                    match record {
                        Record::PutIndex { queue, seq, entry } => {
                            let Some(e) = IndexEntry::decode(entry) else {
                                continue;
                            };
                            let gone = deleted_unseen.contains(&(queue, seq))
                                || deleted_unseen.contains(&(queue, u64::MAX));
                            if !gone && !live.contains(&(queue, seq)) {
                                from_damage.push((queue, seq, e.message));
                            }
                        }
                        Record::PutMessage { id, .. } => {
                            damaged_bodies.insert(id);
                        }
                        _ => {}
                    }
                }
            }
            // An entry of the damage whose message id is far from every
            // body the damage held (and known nowhere else) was hit itself:
            // its fields are noise, and its message is found below as a body
            // no entry names. (Ids are allocated in order, so the bodies of
            // a frame hold a narrow range; the body of an entry whose own
            // record was skipped lies inside it.)
            // (Per node tag: a compacted frame may mix ids of two tags.)
            let mut ranges: std::collections::HashMap<u16, (u64, u64)> = Default::default();
            for m in &damaged_bodies {
                let r = ranges
                    .entry(m.node_tag())
                    .or_insert((m.counter(), m.counter()));
                *r = (r.0.min(m.counter()), r.1.max(m.counter()));
            }
            from_damage.retain(|(_, _, m)| {
                let known = damaged_bodies.contains(m) || state.messages.contains_key(m);
                let near = ranges.get(&m.node_tag()).is_some_and(|&(lo, hi)| {
                    (lo.saturating_sub(8)..=hi.saturating_add(8)).contains(&m.counter())
                });
                known || near || damaged_bodies.is_empty()
            });
            // Bodies the damage held that nothing deleted later and that no
            // entry names: their queue entry was the damaged record itself.
            // Lost too, with their queue unknown.
            let named: std::collections::HashSet<MessageId> = lost
                .iter()
                .chain(&from_damage)
                .map(|(_, _, m)| *m)
                .chain(entries.values().flatten().map(|(_, e)| e.message))
                .collect();
            // A body record the damage hit in its id has noise for an id:
            // it is the body of an entry named above (whose body is then
            // missing), not one more lost message. Ids are allocated in
            // order per node tag, so a real one lies near some other id of
            // its tag (surviving or damaged); one whose tag no other id has,
            // or that is far from every id of its tag, is taken for noise
            // when some entry lost its body (else it is still named).
            let mut counters: std::collections::HashMap<u16, Vec<u64>> = Default::default();
            for id in state
                .messages
                .keys()
                .chain(damaged_bodies.iter())
                .chain(entries.values().flatten().map(|(_, e)| &e.message))
            {
                counters
                    .entry(id.node_tag())
                    .or_default()
                    .push(id.counter());
            }
            for v in counters.values_mut() {
                v.sort_unstable();
                v.dedup();
            }
            let slack = damaged_bodies.len() as u64 + 8;
            let plausible = |id: &MessageId| {
                let Some(v) = counters.get(&id.node_tag()) else {
                    return false;
                };
                let c = id.counter();
                let i = v.partition_point(|&x| x < c);
                let below = i.checked_sub(1).and_then(|j| v.get(j)).copied();
                // (The id itself is in the list: its neighbours are others.)
                let above = v.get(i + 1).copied();
                below.is_some_and(|b| c - b <= slack) || above.is_some_and(|a| a - c <= slack)
            };
            let mut unattributed: Vec<MessageId> = damaged_bodies
                .iter()
                .copied()
                .filter(|id| {
                    !state.messages.contains_key(id)
                        && !bodies_deleted_unseen.contains(id)
                        && !named.contains(id)
                        && ((lost.is_empty() && from_damage.is_empty()) || plausible(id))
                })
                .collect();
            unattributed.sort_unstable();
            lost.extend(from_damage);
            lost.sort_unstable();
            lost.dedup_by_key(|(q, s, _)| (*q, *s));
            if let Some(report) = report.as_deref_mut() {
                report.lost_unattributed = unattributed;
            }
        }
        if let Some(&(queue, seq, message)) = lost.first() {
            match report.as_deref_mut() {
                None => {
                    return Err(StoreError::Damaged(Damage::new(
                        &self.files.dir_path(),
                        format!(
                            "{} queue entries refer to message bodies the log does not hold (the first: queue {queue}, entry {seq}, message {})",
                            lost.len(),
                            message.0
                        ),
                    )));
                }
                Some(report) => {
                    report.actions.push(format!(
                        "{}: {} queue entries refer to message bodies the log does not hold; dropped",
                        self.files.dir_path().display(),
                        lost.len()
                    ));
                    report.lost_entries = lost;
                }
            }
        }
        // References are the index entries that name a message; a body with
        // none is an orphan, deleted by the store after open.
        for (_, e) in entries.values().flatten() {
            state.add_ref(e.message);
        }
        tracing::debug!(
            segments = state.segs.len(),
            messages = state.messages.len(),
            index_entries = entries.values().map(Vec::len).sum::<usize>(),
            "log replayed"
        );
        *lock(&self.recovered) = Some(entries);
        *lock(&self.state) = state;
        if let Some(report) = report {
            let drops: Vec<Write> = report
                .lost_entries
                .iter()
                .map(|&(queue, seq, _)| Write::DeleteIndex { queue, seq })
                .collect();
            self.apply(&drops)?;
            self.sync()?;
        }
        Ok(())
    }

    /// The second pass of replay: now that the bookkeeping knows where every
    /// live index entry is, reads them (and only them) back, in sequence
    /// order per queue. Two passes instead of a map of every entry seen: a
    /// deep queue's recovery holds one vector of its live entries.
    fn live_index_entries(&self, state: &LogState) -> Result<RecoveredIndex, StoreError> {
        let mut entries: RecoveredIndex = state
            .index
            .iter()
            .map(|(&q, qi)| (q, Vec::with_capacity(qi.len())))
            .collect();
        let mut segs: Vec<u64> = state.segs.keys().copied().collect();
        segs.extend(state.open.as_ref().map(|b| b.seg));
        // A segment can hold several puts of one entry (a requeue in the same
        // batch): the last is the live one.
        let mut in_segment: FxHashMap<(u64, u64), IndexEntry> = FxHashMap::default();
        for seg in segs {
            let Some(data) = self.files.read(seg)? else {
                continue;
            };
            let mut r = Reader {
                buf: &data,
                pos: 0,
                seg,
            };
            while let Some(record) = r.record()? {
                if let Record::PutIndex { queue, seq, entry } = record {
                    let entry = IndexEntry::decode(entry).ok_or_else(|| r.corrupt())?;
                    if state.index.get(&queue).and_then(|q| q.get(seq)) == Some(seg) {
                        in_segment.insert((queue, seq), entry);
                    }
                }
            }
            for ((queue, seq), entry) in in_segment.drain() {
                entries.entry(queue).or_default().push((seq, entry));
            }
        }
        for v in entries.values_mut() {
            // First puts arrive in order; moved entries do not.
            v.sort_unstable_by_key(|(seq, _)| *seq);
        }
        entries.retain(|_, v| !v.is_empty());
        Ok(entries)
    }

    /// Appends what a segment's batch added as a frame of its file.
    fn flush(&self, b: &mut Builder) -> Result<(), StoreError> {
        if !b.buf.is_empty() {
            self.files.append(b.seg, &b.buf)?;
            b.size = b.size.saturating_add(b.buf.len() as u32);
            b.file_pos += (b.buf.len() + crate::segment_file::FRAME_HEADER) as u64;
            b.buf.clear();
        }
        // Bounds what a crash can tear (see `MAX_UNSYNCED_FILES`).
        if self.files.unsynced_files() >= MAX_UNSYNCED_FILES {
            self.sync()?;
        }
        Ok(())
    }

    /// Registers a full (flushed) segment and removes what it freed (itself,
    /// if all its records cancelled out).
    fn seal(&self, state: &mut LogState, b: Builder) -> Result<(), StoreError> {
        let seg = b.seg;
        let mut candidates: Vec<u64> = b.cancels.keys().copied().collect();
        let size = b.size;
        state.finish(b, size);
        candidates.push(seg);
        self.settle(state, candidates, None)
    }

    /// Removes the segments among `candidates` (and those they release) that
    /// nothing needs, and strips the ones that are dead but pinned, until no
    /// more can go. `unwritten` is a segment that was never inserted.
    fn settle(
        &self,
        state: &mut LogState,
        mut candidates: Vec<u64>,
        unwritten: Option<u64>,
    ) -> Result<(), StoreError> {
        while !candidates.is_empty() {
            let (removed, pinned) = state.reclaim(candidates.drain(..), self.files.next_sync());
            for (seg, after) in removed {
                if Some(seg) != unwritten {
                    self.files.remove(seg, after);
                }
                self.forget_cached(seg);
            }
            for seg in pinned {
                candidates.extend(self.strip(state, seg)?);
            }
        }
        Ok(())
    }

    fn forget_cached(&self, seg: u64) {
        let mut cache = lock(&self.read_cache);
        if cache.as_ref().is_some_and(|c| c.seg == seg) {
            *cache = None;
        }
    }

    /// Rewrites a segment that has no live records but must stay (its deletes
    /// still cancel records in older segments) to hold deletes only: every put
    /// becomes a delete of the same key, which cancels whatever it superseded
    /// just the same. Newer segments that only had to stay to cancel those puts
    /// are released; they are returned as candidates for removal.
    fn strip(&self, state: &mut LogState, seg: u64) -> Result<Vec<u64>, StoreError> {
        let Some(data) = self.files.read(seg)? else {
            return Ok(Vec::new());
        };
        let mut out = BytesMut::with_capacity(data.len() / 4);
        let mut r = Reader {
            buf: &data,
            pos: 0,
            seg,
        };
        while let Some(record) = r.record()? {
            match record {
                Record::PutMessage { id, .. } | Record::DeleteMessage(id) => {
                    out.put_u8(TAG_DELETE_MESSAGE);
                    out.put_u64(id.0);
                }
                Record::PutIndex { queue, seq, .. } | Record::DeleteIndex { queue, seq } => {
                    out.put_u8(TAG_DELETE_INDEX);
                    out.put_u64(queue);
                    out.put_u64(seq);
                }
                Record::DeleteQueueIndex(queue) => {
                    out.put_u8(TAG_DELETE_QUEUE_INDEX);
                    out.put_u64(queue);
                }
            }
        }
        self.files.rewrite(seg, &out)?;
        self.forget_cached(seg);
        let Some(s) = state.segs.get_mut(&seg) else {
            return Ok(Vec::new());
        };
        s.size = out.len() as u32;
        s.stripped = true;
        let released = std::mem::take(&mut s.cancelled_by);
        let mut candidates = Vec::new();
        // The rewrite is durable once the next sync has synced the directory.
        let after = self.files.next_sync();
        for (newer, n) in released {
            if let Some(ns) = state.segs.get_mut(&newer) {
                ns.pending = ns.pending.saturating_sub(n);
                ns.unlink_after = ns.unlink_after.max(after);
                candidates.push(newer);
            }
        }
        tracing::trace!(segment = seg, "log segment stripped to its deletes");
        Ok(candidates)
    }

    /// Copies the live records of the oldest sparse segment that nothing has
    /// consumed from lately into `b`, so that the segment (and whatever it
    /// pinned) can go.
    fn compact_one(&self, state: &mut LogState, b: &mut Builder) -> Result<(), StoreError> {
        let cold = |s: &Segment| s.touched + COMPACT_MIN_AGE < b.seg;
        let Some(&seg) = state
            .sparse
            .iter()
            .find(|&&s| state.segs.get(&s).is_some_and(|s| s.live > 0 && cold(s)))
        else {
            return Ok(());
        };
        state.sparse.remove(&seg);
        let Some(data) = self.files.read(seg)? else {
            return Ok(());
        };
        let mut r = Reader {
            buf: &data,
            pos: 0,
            seg,
        };
        let mut moved = 0u32;
        let mut index: BTreeMap<(u64, u64), &[u8]> = BTreeMap::new();
        while let Some(record) = r.record()? {
            match record {
                // (Two records of one id here — put, delete, put again in
                // one batch — are both copied; the second supersedes.)
                Record::PutMessage { id, encoding, .. } => {
                    let here = state.messages.get(&id).is_some_and(|b| b.seg() == seg);
                    if let Some(refs) = state.refs(id).filter(|_| here) {
                        b.buf.put_u8(TAG_PUT_MESSAGE);
                        b.buf.put_u64(id.0);
                        b.buf.put_u32(encoding.len() as u32);
                        let at = b.file_pos + b.buf.len() as u64;
                        b.buf.put_slice(encoding);
                        state.place_message(b, id, refs, at);
                        moved += 1;
                    }
                }
                // The segment may hold several puts of one entry (a requeue
                // in the same batch); the last one is current.
                Record::PutIndex { queue, seq, entry } => {
                    if state.index.get(&queue).and_then(|q| q.get(seq)) == Some(seg) {
                        index.insert((queue, seq), entry);
                    }
                }
                Record::DeleteMessage(_)
                | Record::DeleteIndex { .. }
                | Record::DeleteQueueIndex(_) => {}
            }
        }
        for ((queue, seq), entry) in index {
            b.buf.put_u8(TAG_PUT_INDEX);
            b.buf.put_u64(queue);
            b.buf.put_u64(seq);
            b.buf.put_slice(entry);
            state.put_index(b, queue, seq);
            moved += 1;
        }
        tracing::debug!(segment = seg, records = moved, "log segment compacted");
        Ok(())
    }
}

impl Storage for SegmentLogStorage {
    fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        let mut state = lock(&self.state);
        let mut b = match state.open.take() {
            Some(b) => b,
            None => {
                state.next_seg += 1;
                Builder::new(state.next_seg - 1)
            }
        };
        let mut definitions = Vec::new();
        let target = self
            .segment_target
            .load(std::sync::atomic::Ordering::Relaxed);
        for w in writes {
            // A large batch is split however small the target.
            if b.size as usize + b.buf.len() >= target.max(SEGMENT_TARGET) {
                self.flush(&mut b)?;
                let next = Builder::new(state.next_seg);
                state.next_seg += 1;
                self.seal(&mut state, std::mem::replace(&mut b, next))?;
            }
            match w {
                // Another queue's reference to a stored body writes nothing.
                Write::PutMessage(m) if state.add_ref(m.id) => {}
                Write::PutMessage(m) => {
                    b.buf.reserve(13 + m.encoded_len_hint());
                    b.buf.put_u8(TAG_PUT_MESSAGE);
                    b.buf.put_u64(m.id.0);
                    let len_at = b.buf.len();
                    b.buf.put_u32(0);
                    let off = b.buf.len();
                    m.encode_into(&mut b.buf);
                    let len = b.buf.len() - off;
                    b.buf[len_at..len_at + 4].copy_from_slice(&(len as u32).to_be_bytes());
                    let at = b.file_pos + off as u64;
                    state.place_message(&mut b, m.id, 1, at);
                }
                // Only the last reference's release deletes the body.
                Write::DeleteMessage(id) if !state.drop_ref(*id) => {}
                Write::DeleteMessage(id) => {
                    b.buf.put_u8(TAG_DELETE_MESSAGE);
                    b.buf.put_u64(id.0);
                    state.remove_message(&mut b, *id);
                }
                Write::PutIndex { queue, seq, entry } => {
                    b.buf.put_u8(TAG_PUT_INDEX);
                    b.buf.put_u64(*queue);
                    b.buf.put_u64(*seq);
                    b.buf.put_slice(&entry.encode());
                    state.put_index(&mut b, *queue, *seq);
                }
                Write::DeleteIndex { queue, seq } => {
                    b.buf.put_u8(TAG_DELETE_INDEX);
                    b.buf.put_u64(*queue);
                    b.buf.put_u64(*seq);
                    state.delete_index(&mut b, *queue, *seq);
                }
                Write::DeleteQueueIndex { queue } => {
                    b.buf.put_u8(TAG_DELETE_QUEUE_INDEX);
                    b.buf.put_u64(*queue);
                    state.delete_queue_index(&mut b, *queue);
                }
                Write::PutDefinition { .. } | Write::DeleteDefinition { .. } => definitions.push(w),
            }
        }
        if !b.buf.is_empty() {
            self.compact_one(&mut state, &mut b)?;
        }
        self.flush(&mut b)?;
        if b.size as usize >= target {
            self.seal(&mut state, b)?;
        } else {
            state.open = Some(b);
        }
        // Definitions are in sled, which may persist them before the log is
        // synced: a queue's definition can be gone after a crash while its
        // index is not (recovery drops index entries of undefined queues), or
        // the other way round (the queue comes back empty).
        for w in definitions {
            match w {
                Write::PutDefinition { kind, key, value } => {
                    let mut buf = BytesMut::new();
                    value
                        .encode(&mut buf)
                        .map_err(|e| StoreError::Engine(format!("definition too large: {e}")))?;
                    self.definitions.insert(def_key(*kind, key), buf.as_ref())?;
                }
                Write::DeleteDefinition { kind, key } => {
                    self.definitions.remove(def_key(*kind, key))?;
                }
                _ => {}
            }
        }
        drop(state);
        if self.files.has_unsynced() && lock(&self.last_sync).elapsed() >= MAX_UNSYNCED_AGE {
            self.sync()?;
        }
        Ok(())
    }

    fn needs_sync(&self) -> bool {
        self.files.has_unsynced()
    }

    fn sync(&self) -> Result<(), StoreError> {
        *lock(&self.last_sync) = std::time::Instant::now();
        self.files.sync()?;
        self.db.flush()?;
        Ok(())
    }

    fn message(&self, id: MessageId) -> Result<Option<Message>, StoreError> {
        // A body in the segment read last comes from it; any other is read
        // alone, near its offset: a record header there must name it, or the
        // segment changed under us (compaction) and it is looked up through
        // its segment.
        let Some(body) = lock(&self.state).messages.get(&id).copied() else {
            return Ok(None);
        };
        let cached = lock(&self.read_cache)
            .as_ref()
            .is_some_and(|c| c.seg == body.seg());
        if !cached {
            if let Some(near) = body.record_near() {
                let window = Body::AT_UNIT as usize - 1 + RECORD_HEADER;
                let found = self
                    .files
                    .read_at(body.seg(), near, window)?
                    .and_then(|w| find_put_record(&w, id));
                if let Some((p, len)) = found {
                    let at = near + (p + RECORD_HEADER) as u64;
                    if let Some(encoding) = self.files.read_at(body.seg(), at, len)? {
                        return Message::decode(id, Bytes::from(encoding)).map(Some);
                    }
                }
            }
        }
        self.message_from_segment(id)
    }

    fn messages_in_order(&self, ids: &[MessageId]) -> Vec<Result<Option<Message>, StoreError>> {
        ids.iter()
            .map(|id| self.message_from_segment(*id))
            .collect()
    }

    fn message_ids(&self) -> Result<Vec<MessageId>, StoreError> {
        Ok(lock(&self.state).messages.keys().copied().collect())
    }

    fn index(&self) -> Result<Vec<(u64, u64, IndexEntry)>, StoreError> {
        let mut queues: Vec<(u64, Vec<(u64, IndexEntry)>)> =
            self.queue_indexes()?.into_iter().collect();
        queues.sort_unstable_by_key(|(q, _)| *q);
        Ok(queues
            .into_iter()
            .flat_map(|(q, entries)| entries.into_iter().map(move |(s, e)| (q, s, e)))
            .collect())
    }

    fn queue_indexes(&self) -> Result<HashMap<u64, Vec<(u64, IndexEntry)>>, StoreError> {
        let recovered = lock(&self.recovered).take();
        let entries = match recovered {
            Some(entries) => entries,
            // Asked again: read them back from the log as it is now.
            None => {
                let state = lock(&self.state);
                self.live_index_entries(&state)?
            }
        };
        Ok(entries.into_iter().collect())
    }

    fn message_census(&self) -> Result<MessageCensus, StoreError> {
        let state = lock(&self.state);
        let mut census = MessageCensus::default();
        for (id, body) in &state.messages {
            census.max_id = census.max_id.max(id.0);
            let max = census.max_counters.entry(id.node_tag()).or_default();
            *max = (*max).max(id.counter());
            if body.refs_field() == 0 {
                census.orphans.push(*id);
            } else {
                census.referenced += 1;
            }
        }
        Ok(census)
    }

    fn definitions(&self) -> Result<Vec<(DefKind, Bytes, FieldTable)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.definitions.iter() {
            let (k, v) = kv?;
            let corrupt = || StoreError::Corrupt {
                what: "definition",
                key: String::from_utf8_lossy(&k).into_owned(),
            };
            let (&kind, name) = k.split_first().ok_or_else(corrupt)?;
            let kind = DefKind::from_octet(kind).ok_or_else(corrupt)?;
            let (table, _) =
                FieldTable::decode(&Bytes::copy_from_slice(&v)).map_err(|_| corrupt())?;
            out.push((kind, Bytes::copy_from_slice(name), table));
        }
        Ok(out)
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(key)?.map(|v| v.to_vec()))
    }

    fn mark_clean(&self) -> Result<(), StoreError> {
        // The newest segment is sealed, so that a cut at one of its frame
        // boundaries is noticed at the next open.
        self.files.seal_open()?;
        self.sync()?;
        // The next segment number: open checks that every lower one is
        // present or journaled, and that none past it appeared.
        let next_segment = {
            let state = lock(&self.state);
            match &state.open {
                // Numbered but never written: no file.
                Some(b) if b.size == 0 => b.seg,
                _ => state.next_seg,
            }
        };
        // Definitions must be on disk before the record vouches for them.
        self.db.flush()?;
        let (definitions, digest) = definitions_digest(&self.definitions)?;
        CleanShutdown {
            next_segment,
            definitions,
            digest,
        }
        .write(&self.dir)
    }

    fn take_clean_shutdown(&self) -> Result<bool, StoreError> {
        self.set_meta("clean", None)?;
        Ok(self
            .clean_shutdown
            .swap(false, std::sync::atomic::Ordering::Relaxed))
    }

    fn set_meta(&self, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        match value {
            Some(v) => self.meta.insert(key, v)?,
            None => self.meta.remove(key)?,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use std::sync::Arc;

    use super::*;

    fn message(id: u64) -> Arc<Message> {
        crate::message::tests::sample(id, format!("message {id}"))
    }

    /// A damaged frame's records are read past the record the damage hit:
    /// reading resumes where every later record parses to the end.
    #[test]
    fn lenient_records_resume_after_the_damaged_record() {
        use bytes::BufMut;
        let mut data = bytes::BytesMut::new();
        let mut index_at = Vec::new();
        for id in 1..=3u64 {
            data.put_u8(TAG_PUT_MESSAGE);
            data.put_u64(id);
            data.put_u32(16);
            data.put_slice(&[id as u8; 16]);
            index_at.push(data.len());
            data.put_u8(TAG_PUT_INDEX);
            data.put_u64(7);
            data.put_u64(id);
            let entry = IndexEntry {
                message: MessageId(id),
                expires_at: 0,
                delivery_count: 0,
                size: 16,
                priority: 0,
                delivered: false,
            };
            data.put_slice(&entry.encode());
        }
        // The second index record's tag and queue id are hit.
        let at = index_at[1];
        for b in &mut data[at..at + 4] {
            *b ^= 0xff;
        }
        let records = lenient_records(&data);
        let entries: Vec<u64> = records
            .iter()
            .filter_map(|r| match r {
                Record::PutIndex { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        let bodies: Vec<u64> = records
            .iter()
            .filter_map(|r| match r {
                Record::PutMessage { id, .. } => Some(id.0),
                _ => None,
            })
            .collect();
        assert_eq!(entries, [1, 3], "only the hit record is lost");
        assert_eq!(bodies, [1, 2, 3]);
    }

    /// Opens the engine with every batch sealing its own segment.
    fn open(dir: &Path) -> SegmentLogStorage {
        let s = SegmentLogStorage::open(dir).unwrap();
        s.set_segment_target(1);
        s
    }

    fn put(id: u64) -> [Write; 2] {
        [
            Write::PutMessage(message(id)),
            Write::PutIndex {
                queue: 1,
                seq: id,
                entry: IndexEntry {
                    message: MessageId(id),
                    size: 10,
                    ..IndexEntry::default()
                },
            },
        ]
    }

    fn delete(id: u64) -> [Write; 2] {
        [
            Write::DeleteIndex { queue: 1, seq: id },
            Write::DeleteMessage(MessageId(id)),
        ]
    }

    /// Segments the bookkeeping holds, checked against the files once every
    /// removal waiting for a sync has been carried out.
    fn stored_segments(s: &SegmentLogStorage) -> usize {
        for _ in 0..1000 {
            s.sync().unwrap();
            if !s.files.has_unsynced() {
                break;
            }
        }
        let n = s.segments();
        let files = std::fs::read_dir(s.files_dir())
            .unwrap()
            .filter(|f| {
                f.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".seg")
            })
            .count();
        assert_eq!(n, files, "bookkeeping and files disagree");
        n
    }

    #[test]
    fn acknowledged_batches_leave_no_segments() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.apply(&(1..=100).flat_map(put).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(stored_segments(&s), 1);
        s.apply(&(1..=100).flat_map(delete).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(stored_segments(&s), 0);
        // Put and delete in one batch cancel out without a segment.
        s.apply(&[put(101), delete(101)].concat()).unwrap();
        assert_eq!(stored_segments(&s), 0);
        drop(s);
        let s = open(dir.path());
        assert!(s.message_ids().unwrap().is_empty());
        assert!(s.index().unwrap().is_empty());
    }

    #[test]
    fn a_delete_keeps_its_segment_until_the_put_it_cancels_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.apply(&[put(1), put(2)].concat()).unwrap(); // segment A
        s.apply(&[delete(1), put(3)].concat()).unwrap(); // segment B cancels into A
        s.apply(&delete(3)).unwrap(); // C cancels 3 in B
        // B has no live records but its delete of 1 must stay while A holds
        // 1's put: B is stripped to its deletes. So C, which only cancelled
        // the put of 3 in B, can go.
        assert_eq!(stored_segments(&s), 2);
        assert!(lock(&s.state).segs.values().any(|seg| seg.stripped));
        drop(s);
        let s = open(dir.path());
        assert_eq!(s.message_ids().unwrap(), vec![MessageId(2)]);
        s.apply(&delete(2)).unwrap();
        assert_eq!(
            stored_segments(&s),
            0,
            "A goes, releasing B, then C and the new one"
        );
    }

    #[test]
    fn a_long_lived_message_is_compacted_and_the_log_stays_short() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.apply(&(1..=100).flat_map(put).collect::<Vec<_>>())
            .unwrap();
        s.apply(&(2..=100).flat_map(delete).collect::<Vec<_>>())
            .unwrap();
        // Traffic that each next batch acknowledges.
        for id in 1000..1100 {
            s.apply(&[delete(id - 1), put(id)].concat()).unwrap();
        }
        assert!(
            stored_segments(&s) <= 4,
            "{} segments: message 1 pins the log",
            s.segments()
        );
        assert_eq!(s.message(MessageId(1)).unwrap().unwrap().body, "message 1");
        drop(s);
        let s = open(dir.path());
        let mut ids = s.message_ids().unwrap();
        ids.sort();
        assert_eq!(ids, vec![MessageId(1), MessageId(1099)]);
        let index: Vec<u64> = s.index().unwrap().iter().map(|e| e.1).collect();
        assert_eq!(index, vec![1, 1099]);
        assert_eq!(s.message(MessageId(1)).unwrap().unwrap().body, "message 1");
    }

    /// A body outside the segment read last is read alone, at the offset
    /// the log keeps for it: right after writing (one frame per batch, a
    /// large batch spanning segments), after reopening (offsets from the
    /// files' frames) and after compaction moved it; reading a queue's next
    /// bodies in order goes through whole segments.
    #[test]
    fn a_random_read_reads_the_record_alone_at_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        for chunk in (1..=4000u64).collect::<Vec<_>>().chunks(100) {
            s.apply(&chunk.iter().flat_map(|&id| put(id)).collect::<Vec<_>>())
                .unwrap();
        }
        s.apply(&(4001..=12000).flat_map(put).collect::<Vec<_>>())
            .unwrap();
        assert!(stored_segments(&s) > 3, "the bodies span segments");
        let check = |s: &SegmentLogStorage| {
            for id in [1, 77, 2500, 4000, 4001, 9999, 12000, 3] {
                let m = s.message(MessageId(id)).unwrap().unwrap();
                assert_eq!(m.body, format!("message {id}"), "message {id}");
            }
            assert!(lock(&s.read_cache).is_none(), "no segment was read whole");
        };
        check(&s);
        drop(s);
        let s = open(dir.path());
        check(&s);
        let in_order = s.messages_in_order(&[MessageId(10), MessageId(11)]);
        assert_eq!(
            in_order[1].as_ref().unwrap().as_ref().unwrap().body,
            "message 11"
        );
        assert!(lock(&s.read_cache).is_some(), "read through its segment");
        // The header is found at whichever of the first 8 positions it is;
        // a window where two positions name the id is not trusted.
        let mut w = vec![0u8; 20];
        w[3] = TAG_PUT_MESSAGE;
        w[4..12].copy_from_slice(&7u64.to_be_bytes());
        w[12..16].copy_from_slice(&99u32.to_be_bytes());
        assert_eq!(find_put_record(&w, MessageId(7)), Some((3, 99)));
        let ones = MessageId(u64::from_be_bytes([TAG_PUT_MESSAGE; 8]));
        assert_eq!(find_put_record(&[TAG_PUT_MESSAGE; 20], ones), None);
    }

    /// A body referenced by more queues than its word counts (255 and up)
    /// keeps its count in the side map: released that many times less one,
    /// it stays; once more, it goes.
    #[test]
    fn reference_counts_past_the_word_are_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let n = 300u64;
        let mut writes = vec![Write::PutMessage(message(1))];
        writes.extend((1..n).map(|_| Write::PutMessage(message(1))));
        s.apply(&writes).unwrap();
        assert_eq!(lock(&s.state).refs(MessageId(1)), Some(n));
        s.apply(&vec![Write::DeleteMessage(MessageId(1)); n as usize - 1])
            .unwrap();
        assert_eq!(lock(&s.state).refs(MessageId(1)), Some(1));
        assert!(lock(&s.state).many_refs.is_empty());
        assert!(s.message(MessageId(1)).unwrap().is_some());
        s.apply(&[Write::DeleteMessage(MessageId(1))]).unwrap();
        assert!(s.message(MessageId(1)).unwrap().is_none());
    }

    #[test]
    fn the_index_can_be_read_again_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.apply(&(1..=3).flat_map(put).collect::<Vec<_>>()).unwrap();
        drop(s);
        let s = open(dir.path());
        let first = s.index().unwrap();
        assert_eq!(first.len(), 3);
        assert_eq!(s.index().unwrap(), first, "a second read finds the same");
        s.apply(&[delete(2), put(4)].concat()).unwrap();
        let seqs: Vec<u64> = s.index().unwrap().iter().map(|e| e.1).collect();
        assert_eq!(seqs, vec![1, 3, 4]);
        assert_eq!(s.message(MessageId(4)).unwrap().unwrap().body, "message 4");
    }

    #[test]
    fn a_superseded_index_entry_does_not_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.apply(&[put(1), put(2)].concat()).unwrap(); // A
        let redelivered = IndexEntry {
            message: MessageId(1),
            size: 10,
            delivered: true,
            delivery_count: 1,
            ..IndexEntry::default()
        };
        s.apply(&[Write::PutIndex {
            queue: 1,
            seq: 1,
            entry: redelivered,
        }])
        .unwrap(); // B supersedes 1's entry in A
        s.apply(&[Write::DeleteIndex { queue: 1, seq: 1 }]).unwrap(); // C deletes B's entry; B could go, but it cancels into A
        drop(s);
        let s = open(dir.path());
        let index: Vec<u64> = s.index().unwrap().iter().map(|e| e.1).collect();
        assert_eq!(index, vec![2]);
    }

    #[test]
    fn deleting_a_queue_index_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.apply(&(1..=10).flat_map(put).collect::<Vec<_>>())
            .unwrap();
        s.apply(&[Write::DeleteQueueIndex { queue: 1 }]).unwrap();
        drop(s);
        let s = open(dir.path());
        assert!(s.index().unwrap().is_empty());
        assert_eq!(
            s.message_ids().unwrap().len(),
            10,
            "bodies go with their own deletes"
        );
    }

    #[test]
    fn a_truncated_segment_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Intact as a file (its checksum matches), but the record in it
            // is cut short.
            let s = open(dir.path());
            // (Segment 0: the first number a new log uses.)
            s.files.append(0, &[TAG_PUT_MESSAGE, 0, 0]).unwrap();
            s.sync().unwrap();
        }
        match SegmentLogStorage::open(dir.path()) {
            Err(StoreError::Corrupt { what, .. }) => assert_eq!(what, "log segment"),
            other => panic!("expected a corrupt segment, got {other:?}"),
        }
    }
}
