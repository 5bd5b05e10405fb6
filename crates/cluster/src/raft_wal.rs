//! [`RaftWal`]: the node's one durable log for Raft — every group's entries,
//! votes, committed marks, truncations and purges — in one append-only file
//! (`<data dir>/raft/raft.wal`), written by one thread that batches whatever
//! is queued from every group into one write and one `fdatasync`.
//!
//! The metadata group uses it now; the per-queue groups of replicated queues
//! will share it (each record carries its group id), so many groups share
//! each fsync. What Raft needs from it:
//! - an append is readable at once and reported durable (its callback)
//!   only after the fsync that covers it;
//! - a vote is durable before `save_vote` returns;
//! - truncations and purges are records too, so a restart sees the log as
//!   it was acknowledged.
//!
//! Frames are `len u32 | crc32 u32 | payload`. A file starts with its
//! identity (a random number; a file from before identities gets one at
//! its next open), and every batch starts with a mark: the file's identity
//! and how far the file was on disk (fsync'd) before the batch. At open, the
//! first frame that is short or fails its checksum is judged:
//! - damage, if a later intact mark of this file says the file was on disk
//!   past it (a crash tears only what no fsync completed), or if intact
//!   frames follow it to the very end (as before marks: a crash cuts the
//!   end of what it was writing). The open fails and changes nothing, since
//!   dropping a vote or an acknowledged entry would break Raft;
//! - else a tail torn by a crash: cut (logged with its size, its octets
//!   kept beside the log).
//!
//! When the file has grown past [`REWRITE_AT`] and
//! is mostly dead records, the writer rewrites it from the live state
//! (temporary file, fsync, rename, directory fsync).
//!
//! The in-memory state (every live record, by group) is what readers read;
//! entries stay in memory until purged, which snapshots bound.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::Mutex;

const TAG_ENTRY: u8 = 1;
const TAG_VOTE: u8 = 2;
const TAG_COMMITTED: u8 = 3;
const TAG_TRUNCATE: u8 = 4;
const TAG_PURGE: u8 = 5;
/// The file's identity (no group: 0): a random `u64`, so that a mark is
/// known for one of this file's, not octets that look like one inside an
/// entry (a message body).
const TAG_FILE: u8 = 6;
/// At the head of every batch (no group: 0): the file's identity and its
/// length on disk (fsync'd) when the batch was written.
const TAG_SYNCED: u8 = 7;
/// A group's entries, committed mark and purge dropped, its vote kept
/// (its replica here stopped for good, or to start again from nothing).
const TAG_RESET: u8 = 8;
/// A mark's record: header, tag, group, identity, length.
const SYNCED_RECORD: usize = 8 + 1 + 8 + 8 + 8;

/// Largest frame accepted at open (a larger length is damage): an entry
/// may carry the largest message a broker accepts, with its batch.
const MAX_FRAME: usize = server::config::MAX_MESSAGE_SIZE_LIMIT as usize + (16 << 20);
/// The file is rewritten from the live state once it is this large and at
/// least twice the live records.
const REWRITE_AT: u64 = 64 << 20;

/// Called once the records it was queued with are on disk (or not).
pub type Flushed = Box<dyn FnOnce(io::Result<()>) + Send>;

/// One group's live records, encoded as the group's storage adapter chose.
#[derive(Debug, Default, Clone)]
pub struct GroupState {
    /// Entries by index.
    pub entries: BTreeMap<u64, Bytes>,
    /// The last vote saved.
    pub vote: Option<Bytes>,
    /// The last committed mark saved.
    pub committed: Option<Bytes>,
    /// The last purge: up to which index, and the purged log id.
    pub purged: Option<(u64, Bytes)>,
}

impl GroupState {
    fn live_bytes(&self) -> u64 {
        let entries: u64 = self.entries.values().map(entry_bytes).sum();
        entries
            + self.vote.as_ref().map_or(0, entry_bytes)
            + self.committed.as_ref().map_or(0, entry_bytes)
            + self.purged.as_ref().map_or(0, |(_, v)| entry_bytes(v) + 8)
    }
}

/// What one live record costs in a rewritten file (about: its frame).
fn entry_bytes(record: &Bytes) -> u64 {
    record.len() as u64 + 32
}

/// One change, in memory and on disk.
enum Change<'a> {
    Entry(u64, &'a Bytes),
    Vote(&'a Bytes),
    Committed(&'a Bytes),
    Truncate(u64),
    Purge(u64, &'a Bytes),
    Reset,
}

fn encode(group: u64, change: &Change<'_>, out: &mut BytesMut) {
    let mut payload = BytesMut::new();
    let (tag, body): (u8, &[u8]) = match change {
        Change::Entry(i, b) => {
            payload.put_u64(*i);
            (TAG_ENTRY, b)
        }
        Change::Vote(b) => (TAG_VOTE, b),
        Change::Committed(b) => (TAG_COMMITTED, b),
        Change::Truncate(i) => {
            payload.put_u64(*i);
            (TAG_TRUNCATE, &[])
        }
        Change::Purge(i, b) => {
            payload.put_u64(*i);
            (TAG_PURGE, b)
        }
        Change::Reset => (TAG_RESET, &[]),
    };
    let mut frame = BytesMut::with_capacity(9 + payload.len() + body.len());
    frame.put_u8(tag);
    frame.put_u64(group);
    frame.put_slice(&payload);
    frame.put_slice(body);
    out.put_u32(frame.len() as u32);
    out.put_u32(crc32fast::hash(&frame));
    out.put_slice(&frame);
}

/// Encodes a record that is about the file, not a group (`TAG_FILE`,
/// `TAG_SYNCED`): its fields after the tag and the group 0.
fn encode_file_record(tag: u8, fields: &[u64], out: &mut BytesMut) {
    let mut frame = BytesMut::with_capacity(9 + 8 * fields.len());
    frame.put_u8(tag);
    frame.put_u64(0);
    for f in fields {
        frame.put_u64(*f);
    }
    out.put_u32(frame.len() as u32);
    out.put_u32(crc32fast::hash(&frame));
    out.put_slice(&frame);
}

/// Applies `change` to the live state; how many octets of live records
/// it added and removed (see [`entry_bytes`]), so that the writer knows
/// the live size without counting every record.
fn apply(groups: &mut HashMap<u64, GroupState>, group: u64, change: &Change<'_>) -> (u64, u64) {
    let g = groups.entry(group).or_default();
    let gone = |old: Option<&Bytes>| old.map_or(0, entry_bytes);
    let all = |entries: &BTreeMap<u64, Bytes>| entries.values().map(entry_bytes).sum::<u64>();
    match change {
        Change::Entry(i, b) => (
            entry_bytes(b),
            gone(g.entries.insert(*i, (*b).clone()).as_ref()),
        ),
        Change::Vote(b) => (entry_bytes(b), gone(g.vote.replace((*b).clone()).as_ref())),
        Change::Committed(b) => (
            entry_bytes(b),
            gone(g.committed.replace((*b).clone()).as_ref()),
        ),
        Change::Truncate(from) => (0, all(&g.entries.split_off(from))),
        Change::Purge(upto, b) => {
            let kept = g.entries.split_off(&(upto + 1));
            let removed = all(&std::mem::replace(&mut g.entries, kept));
            let old = g.purged.replace((*upto, (*b).clone()));
            (
                entry_bytes(b) + 8,
                removed + old.map_or(0, |(_, v)| entry_bytes(&v) + 8),
            )
        }
        Change::Reset => {
            let removed = all(&std::mem::take(&mut g.entries))
                + gone(g.committed.take().as_ref())
                + g.purged.take().map_or(0, |(_, v)| entry_bytes(&v) + 8);
            (0, removed)
        }
    }
}

/// Decodes one frame's payload back into a change and applies it.
fn replay(groups: &mut HashMap<u64, GroupState>, mut frame: Bytes) -> Result<(), String> {
    let short = |_| "record shorter than its header".to_owned();
    let tag = frame.try_get_u8().map_err(short)?;
    let group = frame.try_get_u64().map_err(short)?;
    let index = |f: &mut Bytes| -> Result<u64, String> {
        f.try_get_u64()
            .map_err(|_| "record lacks its index".to_owned())
    };
    // Replayed at open: the live size is summed once afterwards.
    let _ = match tag {
        TAG_ENTRY => {
            let i = index(&mut frame)?;
            apply(groups, group, &Change::Entry(i, &frame))
        }
        TAG_VOTE => apply(groups, group, &Change::Vote(&frame)),
        TAG_COMMITTED => apply(groups, group, &Change::Committed(&frame)),
        TAG_TRUNCATE => {
            let i = index(&mut frame)?;
            apply(groups, group, &Change::Truncate(i))
        }
        TAG_PURGE => {
            let i = index(&mut frame)?;
            apply(groups, group, &Change::Purge(i, &frame))
        }
        TAG_RESET => apply(groups, group, &Change::Reset),
        // Read at open (`RaftWal::open`), no group state.
        TAG_FILE | TAG_SYNCED => (0, 0),
        other => return Err(format!("unknown record tag {other}")),
    };
    Ok(())
}

struct Job {
    frames: BytesMut,
    done: Option<Flushed>,
}

struct Shared {
    groups: Mutex<HashMap<u64, GroupState>>,
    /// The live records' size (changed under the `groups` lock): what a
    /// rewrite would write.
    live: std::sync::atomic::AtomicU64,
    /// Jobs go to the writer under the `groups` lock, so the file's order is
    /// the memory's order.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The node's Raft log file and its live state.
#[derive(Clone)]
pub struct RaftWal {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RaftWal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftWal").finish_non_exhaustive()
    }
}

/// What `RaftWal::open` found.
#[derive(Debug, Default)]
pub struct Opened {
    /// Octets cut from the end: a last batch no fsync completed.
    pub torn_tail: u64,
}

/// The length of the record at `at` in `data` if it is whole and passes its
/// checksum (a record is never empty: it starts with its tag).
fn intact_record(data: &[u8], at: usize) -> Option<usize> {
    let rest = data.get(at..)?;
    let head: [u8; 8] = rest.get(..8)?.try_into().ok()?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if len == 0 || len > MAX_FRAME {
        return None;
    }
    let frame = rest.get(8..8 + len)?;
    (crc32fast::hash(frame) == crc).then_some(len)
}

/// The length of the record whose header is at `at` if the header is
/// plausible: a length that fits before the end, and a known tag first.
fn plausible_record(data: &[u8], at: usize) -> Option<usize> {
    let head = data.get(at..at + 9)?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let fits = (1..=MAX_FRAME).contains(&len) && at + 8 + len <= data.len();
    (fits && (TAG_ENTRY..=TAG_RESET).contains(&head[8])).then_some(len)
}

/// Where, after the failing record at `bad`, intact records run exactly to
/// the end of `data`, and how many: damage, not a torn tail (a crash cuts
/// the end of what it was writing). A run that starts inside a torn
/// record's octets ends in its cut, not at the end. One pass from the end
/// marks the offsets from which intact records land exactly on it: a
/// record's checksum is computed only when the run after it is intact, so
/// the pass is linear in the tail (plus those records' octets), whatever
/// the tail holds.
fn intact_run_to_the_end(data: &[u8], bad: usize) -> Option<(usize, usize)> {
    let from = bad + 1;
    let n = data.len().checked_sub(from)?;
    // runs[i]: intact records from `from + i` land on the end; the end
    // itself (i = n) does.
    let mut runs = vec![0u64; n / 64 + 1];
    let marked = |r: &[u64], i: usize| r[i / 64] & (1 << (i % 64)) != 0;
    runs[n / 64] |= 1 << (n % 64);
    for i in (0..n).rev() {
        let Some(len) = plausible_record(data, from + i) else {
            continue;
        };
        if marked(&runs, i + 8 + len) && intact_record(data, from + i).is_some() {
            runs[i / 64] |= 1 << (i % 64);
        }
    }
    let first = (0..n).find(|&i| marked(&runs, i))?;
    let (mut at, mut records) = (from + first, 0);
    while let Some(len) = plausible_record(data, at) {
        at += 8 + len;
        records += 1;
    }
    Some((from + first, records))
}

/// The identity a file's record at `at` gives it, if it is an intact
/// `TAG_FILE` record.
fn file_identity(data: &[u8], at: usize) -> Option<u64> {
    let len = intact_record(data, at)?;
    let frame = &data[at + 8..at + 8 + len];
    (len == 17 && frame[0] == TAG_FILE)
        .then(|| u64::from_be_bytes(frame[9..17].try_into().unwrap_or_default()))
}

/// The first intact mark of file `identity` after the failing record at
/// `bad` that says the file was on disk past `bad`: (the mark's offset, the
/// length it gives). A mark never gives more than its own offset.
fn synced_past(data: &[u8], bad: usize, identity: u64) -> Option<(usize, u64)> {
    let head = (SYNCED_RECORD as u32 - 8).to_be_bytes();
    let last = data.len().checked_sub(SYNCED_RECORD)?;
    (bad + 1..=last).find_map(|at| {
        let r = &data[at..at + SYNCED_RECORD];
        if r[..4] != head || r[8] != TAG_SYNCED || r[17..25] != identity.to_be_bytes() {
            return None;
        }
        intact_record(data, at)?;
        let synced = u64::from_be_bytes(r[25..33].try_into().ok()?);
        (synced > bad as u64 && synced <= at as u64).then_some((at, synced))
    })
}

impl RaftWal {
    /// Opens (or creates) the log in `dir` and starts its writer thread.
    /// A tail torn by a crash is cut (kept beside it as
    /// `raft.wal.torn-at-<octet>.<time>`); a damaged record that intact ones
    /// follow is an error, and nothing is changed.
    pub fn open(dir: &Path) -> io::Result<(RaftWal, Opened)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("raft.wal");
        let mut groups = HashMap::new();
        let mut opened = Opened::default();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let data = Bytes::from(data);
        let mut at = 0usize;
        let mut identity = None;
        while at < data.len() {
            let Some(len) = intact_record(&data, at) else {
                break;
            };
            if let Some(id) = file_identity(&data, at) {
                identity = Some(id);
            }
            let frame = data.slice(at + 8..at + 8 + len);
            if let Err(e) = replay(&mut groups, frame) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: record at octet {at}: {e}", path.display()),
                ));
            }
            at += 8 + len;
        }
        if at < data.len() {
            // A crash tears only what no fsync completed: a mark saying the
            // file was on disk past the failing record proves damage.
            if let Some((mark, synced)) = identity.and_then(|id| synced_past(&data, at, id)) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: the record at octet {at} is damaged, and the mark at octet {mark} says the log was on disk up to octet {synced}: not a write torn by a crash. Nothing was changed",
                        path.display()
                    ),
                ));
            }
            // A crash leaves at most a tail that fails: intact records
            // from somewhere after it to the very end are not that.
            if let Some((from, records)) = intact_run_to_the_end(&data, at) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: the record at octet {at} is damaged, and {records} intact record(s) follow it from octet {from} to the end: not a write torn by a crash. Nothing was changed",
                        path.display()
                    ),
                ));
            }
            opened.torn_tail = (data.len() - at) as u64;
            // Kept, as the store keeps what it cuts.
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let kept = dir.join(format!("raft.wal.torn-at-{at}.{since}"));
            std::fs::write(&kept, &data[at..])?;
            tracing::warn!(
                file = %path.display(),
                octets = opened.torn_tail,
                kept = %kept.display(),
                "cutting a tail torn by a crash (written after the last sync) from the Raft log"
            );
            file.set_len(at as u64)?;
        }
        // What was read is on disk before any mark says so (a process
        // crash leaves written octets in the page cache, not on disk).
        file.sync_all()?;
        let mut len = at as u64;
        let identity = match identity {
            Some(id) => id,
            None if at == 0 => {
                // A new file.
                let id = rand::random::<u64>();
                let mut record = BytesMut::new();
                encode_file_record(TAG_FILE, &[id], &mut record);
                file.write_all(&record)?;
                file.sync_data()?;
                len += record.len() as u64;
                id
            }
            None => {
                // A file from before identities: written again with its
                // identity first, so that the marks after cover its old
                // records too (temporary file, fsync, rename, directory
                // fsync, as a rewrite).
                let id = rand::random::<u64>();
                let mut out = BytesMut::with_capacity(at + 32);
                encode_file_record(TAG_FILE, &[id], &mut out);
                out.put_slice(&data[..at]);
                let tmp = path.with_extension("wal.tmp");
                {
                    let mut f = File::create(&tmp)?;
                    f.write_all(&out)?;
                    f.sync_all()?;
                }
                std::fs::rename(&tmp, &path)?;
                File::open(dir)?.sync_all()?;
                file = OpenOptions::new().read(true).append(true).open(&path)?;
                tracing::info!(file = %path.display(), "Raft log written again with an identity at its head");
                len = out.len() as u64;
                id
            }
        };
        let (tx, rx) = mpsc::channel();
        let live = groups.values().map(GroupState::live_bytes).sum();
        let shared = Arc::new(Shared {
            groups: Mutex::new(groups),
            live: std::sync::atomic::AtomicU64::new(live),
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
        });
        let writer = Writer {
            path,
            file,
            len,
            synced: len,
            identity,
            shared: Arc::downgrade(&shared),
        };
        let thread = std::thread::Builder::new()
            .name("raft-wal".into())
            .spawn(move || writer.run(rx))?;
        *shared.writer.lock() = Some(thread);
        Ok((RaftWal { shared }, opened))
    }

    /// A copy of one group's live state.
    pub fn group(&self, group: u64) -> GroupState {
        self.shared
            .groups
            .lock()
            .get(&group)
            .cloned()
            .unwrap_or_default()
    }

    /// The last committed mark of `group` (encoded), without copying the
    /// rest of its state.
    pub fn committed(&self, group: u64) -> Option<Bytes> {
        self.shared.groups.lock().get(&group)?.committed.clone()
    }

    /// Reads entries of `group` in `range` (their encoded bytes).
    pub fn entries(&self, group: u64, range: impl std::ops::RangeBounds<u64>) -> Vec<Bytes> {
        let groups = self.shared.groups.lock();
        groups
            .get(&group)
            .map(|g| g.entries.range(range).map(|(_, e)| e.clone()).collect())
            .unwrap_or_default()
    }

    /// The last entry of `group`, if any.
    pub fn last_entry(&self, group: u64) -> Option<Bytes> {
        let groups = self.shared.groups.lock();
        groups
            .get(&group)
            .and_then(|g| g.entries.last_key_value().map(|(_, e)| e.clone()))
    }

    fn submit(&self, group: u64, changes: &[Change<'_>], done: Option<Flushed>) {
        let mut frames = BytesMut::new();
        for c in changes {
            encode(group, c, &mut frames);
        }
        let mut groups = self.shared.groups.lock();
        for c in changes {
            let (added, removed) = apply(&mut groups, group, c);
            // Under the lock: the sum stays exact.
            let live = &self.shared.live;
            let now = live.load(std::sync::atomic::Ordering::Relaxed);
            live.store(
                (now + added).saturating_sub(removed),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let jobs = self.shared.jobs.lock();
        let failed = match jobs.as_ref() {
            Some(tx) => tx.send(Job { frames, done }).err().and_then(|e| e.0.done),
            None => done,
        };
        drop(jobs);
        drop(groups);
        if let Some(done) = failed {
            done(Err(io::Error::other("the Raft log's writer has stopped")));
        }
    }

    /// Appends entries (index, encoded); readable at once, `done` once
    /// on disk.
    pub fn append(&self, group: u64, entries: &[(u64, Bytes)], done: Flushed) {
        let changes: Vec<Change<'_>> = entries.iter().map(|(i, b)| Change::Entry(*i, b)).collect();
        self.submit(group, &changes, Some(done));
    }

    /// Saves a vote; completes once on disk.
    pub async fn save_vote(&self, group: u64, vote: Bytes) -> io::Result<()> {
        self.durable(group, &[Change::Vote(&vote)]).await
    }

    /// Saves the committed mark (not waited for: Raft can re-learn it).
    pub fn save_committed(&self, group: u64, committed: Bytes) {
        self.submit(group, &[Change::Committed(&committed)], None);
    }

    /// Drops entries from index `from` on; completes once on disk.
    pub async fn truncate(&self, group: u64, from: u64) -> io::Result<()> {
        self.durable(group, &[Change::Truncate(from)]).await
    }

    /// Drops entries up to `upto` (inclusive), remembering the purged id;
    /// completes once on disk.
    pub async fn purge(&self, group: u64, upto: u64, purged: Bytes) -> io::Result<()> {
        self.durable(group, &[Change::Purge(upto, &purged)]).await
    }

    async fn durable(&self, group: u64, changes: &[Change<'_>]) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            group,
            changes,
            Some(Box::new(move |r| {
                let _ = tx.send(r);
            })),
        );
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("the Raft log's writer has stopped")))
    }

    /// Drops `group`'s entries, committed mark and purge (its vote stays:
    /// a vote is never taken back); completes once on disk.
    pub async fn reset(&self, group: u64) -> io::Result<()> {
        self.durable(group, &[Change::Reset]).await
    }

    /// Whether `group` has entries, a committed mark or a purge here.
    pub fn holds(&self, group: u64) -> bool {
        self.shared
            .groups
            .lock()
            .get(&group)
            .is_some_and(|g| !g.entries.is_empty() || g.committed.is_some() || g.purged.is_some())
    }

    /// Stops the writer once what is queued is on disk, and waits for it.
    pub fn close(&self) {
        self.shared.jobs.lock().take();
        if let Some(thread) = self.shared.writer.lock().take() {
            let _ = thread.join();
        }
    }
}

struct Writer {
    path: PathBuf,
    file: File,
    len: u64,
    /// The file's length at the last completed fsync.
    synced: u64,
    /// The file's identity, in each batch's mark.
    identity: u64,
    shared: std::sync::Weak<Shared>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut failed: Option<String> = None;
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let result = match &failed {
                Some(e) => Err(io::Error::other(e.clone())),
                None => self.write(&batch),
            };
            if let Err(e) = &result {
                if failed.is_none() {
                    tracing::error!(file = %self.path.display(), error = %e, "the Raft log cannot be written; refusing further writes");
                    failed = Some(e.to_string());
                }
            }
            for job in batch {
                if let Some(done) = job.done {
                    done(match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                    });
                }
            }
            if failed.is_none() {
                if let Err(e) = self.maybe_rewrite() {
                    tracing::warn!(file = %self.path.display(), error = %e, "cannot rewrite the Raft log; it keeps growing");
                }
            }
        }
    }

    fn write(&mut self, batch: &[Job]) -> io::Result<()> {
        let mut all = BytesMut::new();
        encode_file_record(TAG_SYNCED, &[self.identity, self.synced], &mut all);
        for job in batch {
            all.put_slice(&job.frames);
        }
        self.file.write_all(&all)?;
        self.len += all.len() as u64;
        // Only committed marks (nobody waits for them): on disk with the
        // next batch that is waited for, not an fsync of their own ahead
        // of it.
        if batch.iter().any(|job| job.done.is_some()) {
            tracing::trace!(target: "latency", jobs = batch.len(), octets = all.len(), "wal fsync");
            self.file.sync_data()?;
            self.synced = self.len;
            tracing::trace!(target: "latency", "wal synced");
        }
        Ok(())
    }

    /// Rewrites the file from the live state when it is mostly dead.
    fn maybe_rewrite(&mut self) -> io::Result<()> {
        if self.len < REWRITE_AT {
            return Ok(());
        }
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        if self.len < shared.live.load(std::sync::atomic::Ordering::Relaxed) * 2 {
            return Ok(());
        }
        // The live state is copied under the groups lock, and encoded and
        // written without it: only this thread writes the file, so jobs queued
        // meanwhile wait in the channel and are appended to the new file
        // after the rename. Jobs queued before the copy and not yet written
        // are in the copy and appended again: every record sets state
        // (an entry, a vote, a mark, a cut), so replaying one twice in
        // order changes nothing.
        // (A copy of handles: the records are encoded after the lock.)
        let groups = shared.groups.lock().clone();
        let mut out = BytesMut::new();
        // A new identity: octets of the old file a crash could leave
        // visible are not this file's marks.
        let identity = rand::random::<u64>();
        encode_file_record(TAG_FILE, &[identity], &mut out);
        for (&group, g) in groups.iter() {
            if let Some((upto, purged)) = &g.purged {
                encode(group, &Change::Purge(*upto, purged), &mut out);
            }
            if let Some(v) = &g.vote {
                encode(group, &Change::Vote(v), &mut out);
            }
            if let Some(c) = &g.committed {
                encode(group, &Change::Committed(c), &mut out);
            }
            for (i, e) in &g.entries {
                encode(group, &Change::Entry(*i, e), &mut out);
            }
        }
        let tmp = self.path.with_extension("wal.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&out)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        tracing::info!(file = %self.path.display(), from = self.len, to = out.len(), "Raft log rewritten");
        self.len = out.len() as u64;
        self.synced = self.len;
        self.identity = identity;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn flushed() -> (Flushed, std::sync::mpsc::Receiver<io::Result<()>>) {
        let (tx, rx) = std::sync::mpsc::channel();
        (
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
            rx,
        )
    }

    /// Appends, votes, truncations and purges of two groups come back after
    /// a reopen exactly as they were left.
    #[tokio::test]
    async fn records_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = RaftWal::open(dir.path()).unwrap();
            let entries: Vec<(u64, Bytes)> = (1..=10)
                .map(|i| (i, Bytes::from(format!("e{i}"))))
                .collect();
            let (done, rx) = flushed();
            wal.append(0, &entries, done);
            rx.recv().unwrap().unwrap();
            let (done, rx) = flushed();
            wal.append(7, &[(1, Bytes::from_static(b"other"))], done);
            rx.recv().unwrap().unwrap();
            wal.save_vote(0, Bytes::from_static(b"vote-1"))
                .await
                .unwrap();
            wal.truncate(0, 8).await.unwrap();
            wal.purge(0, 3, Bytes::from_static(b"id-3")).await.unwrap();
            wal.save_vote(0, Bytes::from_static(b"vote-2"))
                .await
                .unwrap();
            wal.close();
        }
        let (wal, opened) = RaftWal::open(dir.path()).unwrap();
        assert_eq!(opened.torn_tail, 0);
        let g = wal.group(0);
        assert_eq!(
            g.entries.keys().copied().collect::<Vec<_>>(),
            vec![4, 5, 6, 7]
        );
        assert_eq!(g.vote.as_deref(), Some(&b"vote-2"[..]));
        assert_eq!(g.purged, Some((3, Bytes::from_static(b"id-3"))));
        assert_eq!(wal.entries(7, ..), vec![Bytes::from_static(b"other")]);
    }

    /// A reset drops a group's entries, committed mark and purge, keeps its
    /// vote, leaves other groups alone, and stays so after a reopen.
    #[tokio::test]
    async fn a_reset_keeps_only_the_vote() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = RaftWal::open(dir.path()).unwrap();
            for group in [1, 2] {
                let (done, rx) = flushed();
                wal.append(
                    group,
                    &[(1, Bytes::from_static(b"a")), (2, Bytes::from_static(b"b"))],
                    done,
                );
                rx.recv().unwrap().unwrap();
                wal.save_vote(group, Bytes::from_static(b"vote"))
                    .await
                    .unwrap();
                wal.save_committed(group, Bytes::from_static(b"2"));
                wal.purge(group, 1, Bytes::from_static(b"id-1"))
                    .await
                    .unwrap();
            }
            assert!(wal.holds(1));
            wal.reset(1).await.unwrap();
            assert!(!wal.holds(1));
            wal.close();
        }
        let (wal, _) = RaftWal::open(dir.path()).unwrap();
        let g = wal.group(1);
        assert!(g.entries.is_empty() && g.committed.is_none() && g.purged.is_none());
        assert_eq!(g.vote.as_deref(), Some(&b"vote"[..]));
        assert!(!wal.holds(1));
        assert!(wal.holds(2));
        assert_eq!(wal.entries(2, ..), vec![Bytes::from_static(b"b")]);
    }

    /// A torn last frame is cut; everything before it stays.
    #[tokio::test]
    async fn a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = RaftWal::open(dir.path()).unwrap();
            let (done, rx) = flushed();
            wal.append(
                0,
                &[
                    (1, Bytes::from_static(b"one")),
                    (2, Bytes::from_static(b"two")),
                ],
                done,
            );
            rx.recv().unwrap().unwrap();
            wal.close();
        }
        let path = dir.path().join("raft.wal");
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 2).unwrap();
        let (wal, opened) = RaftWal::open(dir.path()).unwrap();
        assert!(opened.torn_tail > 0);
        assert_eq!(wal.entries(0, ..), vec![Bytes::from_static(b"one")]);
        // What was cut is kept beside the log.
        let kept: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("raft.wal.torn-at-"))
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        let kept = std::fs::read(dir.path().join(&kept[0])).unwrap();
        assert_eq!(kept.len() as u64, opened.torn_tail);
    }

    /// A log's intact records from the start: (offset, tag).
    fn records(data: &[u8]) -> Vec<(usize, u8)> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(len) = intact_record(data, at) {
            out.push((at, data[at + 8]));
            at += 8 + len;
        }
        out
    }

    /// Three appends, each waited for (each its own batch), in a log in
    /// `dir`; the file's octets and its entries' offsets.
    fn three_entries(dir: &Path) -> (Vec<u8>, Vec<usize>) {
        let (wal, _) = RaftWal::open(dir).unwrap();
        for i in 1..=3u64 {
            let (done, rx) = flushed();
            wal.append(0, &[(i, Bytes::from(format!("entry {i}")))], done);
            rx.recv().unwrap().unwrap();
        }
        wal.close();
        let data = std::fs::read(dir.join("raft.wal")).unwrap();
        let entries: Vec<usize> = records(&data)
            .into_iter()
            .filter(|(_, tag)| *tag == TAG_ENTRY)
            .map(|(at, _)| at)
            .collect();
        assert_eq!(entries.len(), 3);
        (data, entries)
    }

    /// The offset of the record after the one at `at`.
    fn next_record(data: &[u8], at: usize) -> usize {
        at + 8 + u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize
    }

    /// A record that fails its checksum while a later mark says it was on
    /// disk is damage, not a crash's torn write: refused, nothing changed.
    /// The same octet bad in the last record, which no later mark covers,
    /// is a torn write: cut.
    #[tokio::test]
    async fn a_damaged_record_a_later_mark_covers_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut data, entries) = three_entries(dir.path());
        let path = dir.path().join("raft.wal");
        let second = entries[1];
        let second_end = next_record(&data, second);
        data[second_end - 1] ^= 1;
        std::fs::write(&path, &data).unwrap();
        let e = RaftWal::open(dir.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let text = e.to_string();
        assert!(
            text.contains(&format!("the record at octet {second} is damaged"))
                && text.contains("says the log was on disk up to octet"),
            "{text}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), data, "nothing was changed");
        // The same octet bad in the last record: a torn write, cut.
        data[second_end - 1] ^= 1;
        let last = data.len() - 1;
        data[last] ^= 1;
        std::fs::write(&path, &data).unwrap();
        let (wal, opened) = RaftWal::open(dir.path()).unwrap();
        assert_eq!(opened.torn_tail, (data.len() - entries[2]) as u64);
        assert_eq!(wal.entries(0, ..).len(), 2);
    }

    /// Damage, then a crash that tore the end: no intact run reaches the
    /// end, but the marks after the damaged record say it was on disk, so
    /// it is refused (it used to be cut, with every record after it).
    #[tokio::test]
    async fn damage_followed_by_a_torn_tail_is_refused_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut data, entries) = three_entries(dir.path());
        let path = dir.path().join("raft.wal");
        data[entries[0] + 12] ^= 0x40;
        data.truncate(data.len() - 2);
        std::fs::write(&path, &data).unwrap();
        let e = RaftWal::open(dir.path()).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("the record at octet {} is damaged", entries[0])),
            "{e}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), data, "nothing was changed");
    }

    /// Octets that look like a mark inside a torn entry (a message body can
    /// hold anything) count only with the file's identity, which no client
    /// knows: with another, the torn tail is cut.
    #[tokio::test]
    async fn a_mark_inside_a_torn_entry_counts_only_with_the_files_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = RaftWal::open(dir.path()).unwrap();
        let (done, rx) = flushed();
        wal.append(0, &[(1, Bytes::from_static(b"kept"))], done);
        rx.recv().unwrap().unwrap();
        wal.close();
        drop(wal);
        let path = dir.path().join("raft.wal");
        let whole = std::fs::read(&path).unwrap();
        let identity = file_identity(&whole, 0).unwrap();
        // The log, then an entry torn (its last octet lost) whose body
        // holds a mark of `mark_identity` claiming the log was on disk
        // past the entry's start.
        let with_torn_entry = |mark_identity: u64| {
            let mut body = BytesMut::new();
            encode_file_record(
                TAG_SYNCED,
                &[mark_identity, whole.len() as u64 + 1],
                &mut body,
            );
            // (More of the body after it: what the tear loses.)
            body.put_slice(b"and more");
            let mut record = BytesMut::new();
            encode(0, &Change::Entry(2, &body.freeze()), &mut record);
            let mut data = whole.clone();
            data.extend_from_slice(&record[..record.len() - 1]);
            data
        };
        let data = with_torn_entry(identity ^ 1);
        std::fs::write(&path, &data).unwrap();
        let (wal, opened) = RaftWal::open(dir.path()).unwrap();
        assert_eq!(opened.torn_tail, (data.len() - whole.len()) as u64);
        assert_eq!(wal.entries(0, ..), vec![Bytes::from_static(b"kept")]);
        wal.close();
        drop(wal);
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        // With the file's identity it would be believed (why the identity
        // is random): refused.
        std::fs::write(&path, with_torn_entry(identity)).unwrap();
        let e = RaftWal::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("says the log was on disk"), "{e}");
    }

    /// A log written before files had an identity and marks opens as it
    /// was and is written again with an identity at its head, so that the
    /// marks written after cover its old records too.
    #[tokio::test]
    async fn a_log_from_before_marks_opens_and_gains_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.wal");
        let mut old = BytesMut::new();
        encode(
            0,
            &Change::Entry(1, &Bytes::from_static(b"old one")),
            &mut old,
        );
        encode(
            0,
            &Change::Entry(2, &Bytes::from_static(b"old two")),
            &mut old,
        );
        std::fs::write(&path, &old).unwrap();
        {
            let (wal, opened) = RaftWal::open(dir.path()).unwrap();
            assert_eq!(opened.torn_tail, 0);
            assert_eq!(wal.entries(0, ..).len(), 2);
            let (done, rx) = flushed();
            wal.append(0, &[(3, Bytes::from_static(b"new"))], done);
            rx.recv().unwrap().unwrap();
            wal.close();
        }
        let mut data = std::fs::read(&path).unwrap();
        let tags: Vec<u8> = records(&data).into_iter().map(|(_, t)| t).collect();
        assert_eq!(
            tags,
            vec![TAG_FILE, TAG_ENTRY, TAG_ENTRY, TAG_SYNCED, TAG_ENTRY]
        );
        // The old first entry damaged, and the end torn by a crash: the
        // mark after it says it was on disk, so it is refused, not cut.
        let first_entry = records(&data)[1].0;
        data[first_entry + 12] ^= 1;
        data.truncate(data.len() - 1);
        std::fs::write(&path, &data).unwrap();
        let e = RaftWal::open(dir.path()).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("the record at octet {first_entry} is damaged"))
                && e.to_string().contains("says the log was on disk"),
            "{e}"
        );
    }

    /// A torn tail that looks like records throughout (headers that fit,
    /// checksums that fail) is still a torn tail, and is judged in one pass
    /// (a walk from every offset would take hours here).
    #[tokio::test]
    async fn a_tail_of_record_like_octets_is_cut_in_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = RaftWal::open(dir.path()).unwrap();
            let (done, rx) = flushed();
            wal.append(0, &[(1, Bytes::from_static(b"kept"))], done);
            rx.recv().unwrap().unwrap();
            wal.close();
        }
        let path = dir.path().join("raft.wal");
        let mut data = std::fs::read(&path).unwrap();
        let whole = data.len();
        // A record cut short, then 4 MiB of 9-octet "records" whose
        // checksums fail.
        data.extend_from_slice(&[0, 0, 0, 40, 0, 0, 0, 0, TAG_ENTRY]);
        for _ in 0..(4 << 20) / 9 {
            data.extend_from_slice(&[0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef, TAG_ENTRY]);
        }
        std::fs::write(&path, &data).unwrap();
        let (wal, opened) = RaftWal::open(dir.path()).unwrap();
        assert_eq!(opened.torn_tail, (data.len() - whole) as u64);
        assert_eq!(wal.entries(0, ..), vec![Bytes::from_static(b"kept")]);
    }

    /// A rewrite keeps exactly the live records.
    #[test]
    fn a_rewrite_keeps_the_live_records() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = RaftWal::open(dir.path()).unwrap();
        let big = Bytes::from(vec![7u8; 1 << 20]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for round in 0..80u64 {
            let (done, rx) = flushed();
            wal.append(0, &[(round + 1, big.clone())], done);
            rx.recv().unwrap().unwrap();
            if round > 0 {
                rt.block_on(wal.purge(0, round, Bytes::from(format!("p{round}"))))
                    .unwrap();
            }
        }
        wal.close();
        drop(wal);
        let len = std::fs::metadata(dir.path().join("raft.wal"))
            .unwrap()
            .len();
        assert!(len < 40 << 20, "not rewritten: {len} octets");
        let (wal, _) = RaftWal::open(dir.path()).unwrap();
        let g = wal.group(0);
        assert_eq!(g.entries.keys().copied().collect::<Vec<_>>(), vec![80]);
        assert_eq!(g.purged.map(|p| p.0), Some(79));
    }

    proptest::proptest! {
        /// The live size kept as changes are made is what counting every
        /// live record gives (what decides a rewrite).
        #[test]
        fn the_running_live_size_is_the_counted_one(
            ops in proptest::collection::vec((0u8..6, 0u64..3, 0u64..40, 0usize..300), 1..200)
        ) {
            let mut groups = HashMap::new();
            let mut live = 0u64;
            for (op, group, index, len) in ops {
                let b = Bytes::from(vec![1u8; len]);
                let change = match op {
                    0 => Change::Entry(index, &b),
                    1 => Change::Vote(&b),
                    2 => Change::Committed(&b),
                    3 => Change::Truncate(index),
                    4 => Change::Purge(index, &b),
                    _ => Change::Reset,
                };
                let (added, removed) = apply(&mut groups, group, &change);
                live = (live + added).checked_sub(removed).unwrap();
                let counted: u64 = groups.values().map(GroupState::live_bytes).sum();
                proptest::prop_assert_eq!(live, counted);
            }
        }
    }
}
