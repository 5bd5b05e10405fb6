//! [`SegmentFiles`]: the message log's segments as files of their own, one per
//! segment, in `<data dir>/log/`. The log lives outside sled so that the
//! operating system's page cache, not the broker's heap, holds what was
//! written: sled keeps every value it was given in memory, which for a deep
//! backlog was most of the broker's resident memory.
//!
//! A file is `<segment number, 16 hex digits>.seg`: a header (the magic
//! `WRNSEG04`, the segment's number and a CRC-32 of both), then frames, each
//! a length (u32 BE), a CRC-32 of its data (u32 BE) and the data. The
//! segment being filled gets a frame per batch the writer applies (so a file
//! holds ~256 KiB however small the batches); its data is the frames' data
//! back to back. When appends move on to the next segment, the last one gets
//! a seal frame ([`SEAL_RECORD`]), so that every segment but the newest ends
//! with one and a cut at a frame boundary is noticed.
//!
//! ## Crash safety
//!
//! - Writes are not synced one by one: [`SegmentFiles::sync`] fsyncs every file
//!   written since the last sync, in order, then the directory. Nothing a
//!   caller was promised durable is newer than the last sync.
//! - So after a crash only frames newer than every synced one can be torn. At
//!   open the first frame that is short or fails its checksum ends the log:
//!   its file is cut there and every later file removed (none of it was
//!   synced, so no commit point covered it).
//! - A segment is removed only after the records that made it unneeded are on
//!   disk: a removal names the sync it must wait for ([`SegmentFiles::remove`]).
//!   A removal that another one made possible (a delete whose target just
//!   went) waits one sync more, so that the directory fsync in between orders
//!   them: a crash can never keep a delete's segment gone while the put it
//!   cancelled comes back.
//! - A segment rewritten in place ([`SegmentFiles::rewrite`]) is written to a
//!   temporary file, fsync'd and renamed over the old one: either version is
//!   complete.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use crate::damage::{Damage, Quarantine};
use crate::error::StoreError;
use crate::removal_journal::RemovalJournal;

/// A segment's header: the magic, its own number (u64 BE) and a CRC-32 of
/// both, so that a segment file copied over another is told apart.
const MAGIC: &[u8; 8] = b"WRNSEG04";
pub(crate) const HEADER: usize = 20;
/// Segments from builds before segments were sealed: the same header.
const MAGIC_V3: &[u8; 8] = b"WRNSEG03";
/// Segments from builds before the header named the segment: magic only.
const MAGIC_V2: &[u8; 8] = b"WRNSEG02";

/// The seal: a frame holding this one octet, written when appends move on
/// to the next segment (and to the newest one at open, since new writes go
/// to a new segment). Every segment but the newest must end with it, so a
/// segment cut at a frame boundary is told from a shorter one. Reads leave
/// it out of a segment's data.
pub(crate) const SEAL_RECORD: u8 = 6;

fn header(seg: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&seg.to_be_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..].copy_from_slice(&crc.to_be_bytes());
    h
}

/// The header's length and whether the file's format seals segments, or
/// what is wrong with it.
fn check_header(raw: &[u8], seg: u64) -> Result<(usize, bool), String> {
    if raw.starts_with(MAGIC_V2) {
        return Ok((MAGIC_V2.len(), false));
    }
    let sealed_format = raw.starts_with(MAGIC);
    if !sealed_format && !raw.starts_with(MAGIC_V3) {
        return Err("not a log segment (bad magic)".into());
    }
    let Some(h) = raw.get(..HEADER) else {
        return Err("the segment header is cut short".into());
    };
    let mut expected = header(seg);
    if !sealed_format {
        expected[..8].copy_from_slice(MAGIC_V3);
        let crc = crc32fast::hash(&expected[..16]);
        expected[16..].copy_from_slice(&crc.to_be_bytes());
    }
    if h != expected {
        let mut n = [0u8; 8];
        n.copy_from_slice(&h[8..16]);
        return Err(format!(
            "the header names segment {:016x}, not this one (a copy of another segment?), or is damaged",
            u64::from_be_bytes(n)
        ));
    }
    Ok((HEADER, sealed_format))
}
pub(crate) const FRAME_HEADER: usize = 8;

/// Where each frame's data starts: (offset in the segment's data, offset in
/// its file), in order.
pub(crate) type FrameLayout = Vec<(usize, u64)>;

/// Most finished files that may wait for a sync ([`SegmentFiles::append`]
/// callers sync past it). So a crash can tear at most this many files and the
/// open one: a bad frame followed by more files than that is not a torn
/// tail but corruption, and open refuses the log instead of cutting it.
pub(crate) const MAX_UNSYNCED_FILES: usize = 32;

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Engine(format!("{what} {}: {e}", path.display()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What open needs to know about the previous run, and what to do with damage.
pub(crate) struct LogOpen<'a> {
    /// The previous run shut down cleanly: nothing can be torn.
    pub(crate) clean: bool,
    /// The segment number a clean shutdown recorded as the next to be used
    /// (every lower one is present or journaled); `None` after a crash or
    /// from an older build.
    pub(crate) clean_next: Option<u64>,
    /// Whether the removal journal must exist (the directory was written by
    /// a build that keeps one).
    pub(crate) journal_required: bool,
    /// Repair damage (quarantine it) instead of refusing to open.
    pub(crate) repair: bool,
    /// Where cut or damaged parts are moved.
    pub(crate) quarantine: &'a mut Quarantine,
    /// What was cut or repaired, one line each (for the repair report).
    pub(crate) actions: &'a mut Vec<String>,
    /// When repairing: the data of each damaged frame, read as well as it
    /// can be (checksum ignored), so the caller can tell which records the
    /// damage held.
    pub(crate) damaged_frames: &'a mut Vec<Vec<u8>>,
}

/// Walks a damaged stretch's frames ignoring their checksums, as long as
/// their lengths hold together: the best reading of what the damage held.
/// A length that runs past the stretch was itself hit: that frame is taken
/// to run to the stretch's end (which is where a good frame resumes, or the
/// file ends).
fn lenient_frames(stretch: &[u8], out: &mut Vec<Vec<u8>>) {
    let mut pos = if stretch.starts_with(MAGIC) {
        HEADER
    } else if stretch.starts_with(MAGIC_V2) {
        MAGIC_V2.len()
    } else {
        0
    };
    while let Some(len) = stretch.get(pos..pos + 4) {
        let mut x = [0u8; 4];
        x.copy_from_slice(len);
        let len = u32::from_be_bytes(x) as usize;
        let start = pos + FRAME_HEADER;
        match stretch.get(start..start.saturating_add(len)) {
            Some(data) if len > 0 => {
                out.push(data.to_vec());
                pos = start + len;
            }
            _ => {
                if let Some(rest) = stretch.get(start..).filter(|r| !r.is_empty()) {
                    out.push(rest.to_vec());
                }
                break;
            }
        }
    }
}

/// Why a segment's frames stop being trustworthy, and where.
struct BadFrame {
    at: u64,
    why: String,
}

/// A segment file's frames as open checks them.
struct Scan {
    /// The header's length (0: the header is bad).
    header: usize,
    /// The good frames' data ranges (in file offsets), in order.
    frames: Vec<std::ops::Range<usize>>,
    /// Each damaged stretch: its range and what is wrong. Without `resync`
    /// at most one, running to the end of the file.
    bad: Vec<(std::ops::Range<usize>, BadFrame)>,
    /// The file's format seals segments.
    sealed_format: bool,
    /// Its last good frame is the seal.
    sealed: bool,
}

fn frame_at(raw: &[u8], pos: usize) -> Result<std::ops::Range<usize>, String> {
    let Some(header) = raw.get(pos..pos + FRAME_HEADER) else {
        return Err(format!(
            "a frame header cut short at offset {pos} ({} of {FRAME_HEADER} octets)",
            raw.len().saturating_sub(pos)
        ));
    };
    let field = |i: usize| {
        let mut x = [0u8; 4];
        x.copy_from_slice(&header[i..i + 4]);
        u32::from_be_bytes(x)
    };
    let (len, crc) = (field(0) as usize, field(4));
    let start = pos + FRAME_HEADER;
    // (An empty frame is never written: zeros are not a frame.)
    if len == 0 {
        return Err(format!("an empty frame at offset {pos}"));
    }
    let Some(data) = raw.get(start..start.saturating_add(len)) else {
        return Err(format!(
            "a frame at offset {pos} claims {len} octets, the file has {} after its header",
            raw.len() - start
        ));
    };
    if crc32fast::hash(data) != crc {
        return Err(format!(
            "the frame at offset {pos} ({len} octets) fails its checksum"
        ));
    }
    Ok(start..start + len)
}

/// Scans a segment file. With `resync`, a bad frame whose length still leads
/// to a good frame (or to the end) is skipped and scanning goes on after it;
/// otherwise the first bad frame ends the scan.
fn scan(raw: &[u8], seg: u64, resync: bool) -> Scan {
    let mut out = Scan {
        header: 0,
        frames: Vec::new(),
        bad: Vec::new(),
        sealed_format: false,
        sealed: false,
    };
    let mut pos = match check_header(raw, seg) {
        Ok((len, sealed_format)) => {
            out.sealed_format = sealed_format;
            len
        }
        Err(why) => {
            out.bad.push((0..raw.len(), BadFrame { at: 0, why }));
            return out;
        }
    };
    out.header = pos;
    while pos < raw.len() {
        match frame_at(raw, pos) {
            Ok(r) => {
                pos = r.end;
                out.frames.push(r);
            }
            Err(why) => {
                let bad = BadFrame {
                    at: pos as u64,
                    why,
                };
                // The length field may have survived a flip in the data;
                // if not (or the next frame's header was hit too), the next
                // frame whose checksum holds is where good data resumes.
                let skip_to = raw
                    .get(pos..pos + 4)
                    .map(|l| {
                        let mut x = [0u8; 4];
                        x.copy_from_slice(l);
                        pos + FRAME_HEADER + u32::from_be_bytes(x) as usize
                    })
                    .filter(|&next| {
                        resync
                            && next > pos + FRAME_HEADER
                            && (next == raw.len() || frame_at(raw, next).is_ok())
                    })
                    .or_else(|| {
                        resync
                            .then(|| {
                                (pos + FRAME_HEADER + 1..raw.len())
                                    .find(|&q| frame_at(raw, q).is_ok())
                            })
                            .flatten()
                    });
                match skip_to {
                    Some(next) => {
                        out.bad.push((pos..next, bad));
                        pos = next;
                    }
                    None => {
                        out.bad.push((pos..raw.len(), bad));
                        return out;
                    }
                }
            }
        }
    }
    out.sealed = out
        .frames
        .last()
        .is_some_and(|r| raw.get(r.clone()) == Some(&[SEAL_RECORD][..]));
    // A file is created with its first frame (an append or a rewrite), so
    // a header with nothing after it was cut short — a crash between the
    // two writes, or damage: never a segment that held nothing.
    if out.frames.is_empty() && out.bad.is_empty() {
        out.bad.push((
            pos..raw.len(),
            BadFrame {
                at: pos as u64,
                why: "no frame after the header (every segment is written with at least one): cut short".into(),
            },
        ));
    }
    out
}

/// Counts the numbers in `[floor, next)` neither present nor journaled, and
/// names the first few.
fn missing_segments(
    floor: u64,
    next: u64,
    present: &[u64],
    removed: &BTreeSet<u64>,
) -> (u64, Vec<u64>) {
    let known: BTreeSet<u64> = present
        .iter()
        .copied()
        .chain(removed.iter().copied())
        .filter(|s| (floor..next).contains(s))
        .collect();
    let missing = next.saturating_sub(floor) - known.len() as u64;
    let mut first = Vec::new();
    let mut expect = floor;
    for &k in known.iter().chain(std::iter::once(&next)) {
        while expect < k && first.len() < 5 {
            first.push(expect);
            expect += 1;
        }
        expect = k + 1;
        if first.len() >= 5 {
            break;
        }
    }
    (missing, first)
}

/// Writes a file and fsyncs it (a quarantined copy).
fn write_synced(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let mut f = File::create(path).map_err(|e| io("cannot create", path, e))?;
    f.write_all(data).map_err(|e| io("cannot write", path, e))?;
    f.sync_all().map_err(|e| io("cannot sync", path, e))
}

#[derive(Default)]
struct Unsynced {
    /// The segment being appended to.
    open: Option<(u64, File)>,
    /// Whether it has frames not yet synced.
    open_dirty: bool,
    /// Files finished since the last sync, not yet synced.
    files: Vec<File>,
    /// Whether the directory changed (created, renamed, removed) since then.
    dir_changed: bool,
    /// Removals waiting for a sync, by the number of the sync they wait for.
    removals: BTreeMap<u64, Vec<u64>>,
    /// Syncs completed.
    synced: u64,
    /// A write or sync failed: nothing more is written, synced or removed
    /// (what is on disk may be incomplete; the next open sorts it out).
    failed: Option<String>,
    /// Segment files that exist (for the journal's floor).
    present: BTreeSet<u64>,
}

/// The log's segment files.
pub(crate) struct SegmentFiles {
    dir: PathBuf,
    unsynced: Mutex<Unsynced>,
    /// Removals are journaled before their files go (set by open).
    journal: Mutex<Option<RemovalJournal>>,
}

impl SegmentFiles {
    /// Opens (creating it if needed) the directory and returns the segments
    /// that make up the log, in order, and the first segment number not used
    /// yet. Checks that no segment is missing and that every frame is whole:
    /// a torn tail after a crash is cut (moved to quarantine); any other
    /// damage is refused, or quarantined when repairing.
    pub(crate) fn open(
        dir: &Path,
        opts: LogOpen<'_>,
    ) -> Result<(SegmentFiles, Vec<u64>, u64), StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        let mut segs = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io("cannot list", dir, e))? {
            let entry = entry.map_err(|e| io("cannot list", dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            match name
                .strip_suffix(".seg")
                .map(|n| u64::from_str_radix(n, 16))
            {
                Some(Ok(seg)) => segs.push(seg),
                // A rewrite's or a journal compaction's temporary file: the
                // file it was to replace is still there.
                _ if name.ends_with(".tmp") => {
                    let path = entry.path();
                    std::fs::remove_file(&path).map_err(|e| io("cannot remove", &path, e))?;
                }
                _ => {}
            }
        }
        segs.sort_unstable();
        let journal_path = RemovalJournal::path_in(dir);
        let damaged =
            |path: &Path, problem: String| StoreError::Damaged(Damage::new(path, problem));
        let journal = match RemovalJournal::read(dir) {
            Err(StoreError::Damaged(d)) if opts.repair => {
                opts.actions.push(format!(
                    "{d}; rebuilt it from the segments present (a segment missing before this repair cannot be detected)"
                ));
                None
            }
            other => other?,
        };
        let (floor, mut removed) = match journal {
            Some((floor, removed)) => (floor, removed),
            None if opts.journal_required && !opts.repair => {
                return Err(damaged(
                    &journal_path,
                    "the log's removal journal is missing: a missing segment could not be told from a removed one".into(),
                ));
            }
            // A directory from a build without the journal (or a repair):
            // every gap between the segments present is taken as removed.
            None => {
                let floor = segs.first().copied().unwrap_or(0);
                let present: BTreeSet<u64> = segs.iter().copied().collect();
                let last = segs.last().copied().unwrap_or(0);
                let gaps = (floor..last).filter(|s| !present.contains(s)).collect();
                (floor, gaps)
            }
        };
        let files = SegmentFiles {
            dir: dir.to_path_buf(),
            unsynced: Mutex::new(Unsynced::default()),
            journal: Mutex::new(None),
        };
        let mut emptied = Vec::new();
        // Files nothing explains after a clean shutdown: a segment the log
        // removed, or one numbered past the last the log used.
        if opts.clean {
            let mut unexplained = Vec::new();
            for &seg in &segs {
                let why = if removed.contains(&seg) {
                    "the log removed this segment, yet it is present"
                } else if opts.clean_next.is_some_and(|next| seg >= next) {
                    "this segment is numbered past the last one the log wrote before its clean shutdown"
                } else {
                    continue;
                };
                if !opts.repair {
                    return Err(damaged(&files.path(seg), why.into()));
                }
                unexplained.push(seg);
                opts.actions.push(format!(
                    "{}: {why}; moved to quarantine",
                    files.path(seg).display()
                ));
            }
            for &seg in &unexplained {
                files.quarantine_file(seg, opts.quarantine)?;
            }
            segs.retain(|s| !unexplained.contains(s));
        }
        let next = [
            segs.last().map(|s| s + 1),
            removed.last().map(|s| s + 1),
            opts.clean_next,
            Some(floor),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0);
        // Every number in [floor, next) must be present or journaled.
        let (missing, first_missing) = missing_segments(floor, next, &segs, &removed);
        if missing > 0 {
            let list = first_missing
                .iter()
                .map(|s| format!("{s:016x}.seg"))
                .collect::<Vec<_>>()
                .join(", ");
            let problem = format!(
                "{missing} log segment(s) missing that the log never removed: {list}{}",
                if missing > first_missing.len() as u64 {
                    ", ..."
                } else {
                    ""
                }
            );
            if !opts.repair {
                return Err(damaged(dir, problem));
            }
            opts.actions.push(format!(
                "{}: {problem}; their messages are lost (listed below where their queue entries survive)",
                dir.display()
            ));
            let present: BTreeSet<u64> = segs.iter().copied().collect();
            for s in floor..next {
                if !present.contains(&s) && !removed.contains(&s) {
                    removed.insert(s);
                }
            }
        }
        // Rewritten at every open: a torn last append goes, and the floor
        // rises to the lowest segment present (everything below is gone).
        let floor = segs.first().copied().unwrap_or(next).max(floor);
        let mut journal = RemovalJournal::create(dir, floor, removed)?;
        // Everything found is checked and made durable before anything is
        // removed on its account (a previous run may have written it
        // without syncing).
        let mut valid = segs.len();
        // Segments whose last good frame is the seal (see below).
        let mut sealed = BTreeSet::new();
        for (i, &seg) in segs.iter().enumerate() {
            let path = files.path(seg);
            let mut raw = Vec::new();
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io("cannot open", &path, e))?;
            (&file)
                .read_to_end(&mut raw)
                .map_err(|e| io("cannot read", &path, e))?;
            let later = segs.len() - i - 1;
            // Only frames newer than the last sync can be torn, and at most
            // this file and MAX_UNSYNCED_FILES before it can hold them.
            let torn = !opts.clean && later <= MAX_UNSYNCED_FILES;
            let mut found = scan(&raw, seg, opts.repair && !torn);
            if found.sealed {
                sealed.insert(seg);
            }
            // Every segment but the newest is sealed, and after a clean
            // shutdown the newest too.
            if (later > 0 || opts.clean)
                && found.sealed_format
                && !found.sealed
                && found.bad.is_empty()
            {
                let why = if later > 0 {
                    "the segment does not end with its seal though later ones follow: cut short at a frame boundary"
                } else {
                    "the newest segment does not end with the seal a clean shutdown writes: cut short at a frame boundary"
                };
                found.bad.push((
                    raw.len()..raw.len(),
                    BadFrame {
                        at: raw.len() as u64,
                        why: why.into(),
                    },
                ));
            }
            let Some((_, first_bad)) = found.bad.first() else {
                file.sync_all().map_err(|e| io("cannot sync", &path, e))?;
                continue;
            };
            let good_end = found.frames.last().map_or(0, |r| r.end);
            if torn {
                // A crash cut the log here: nobody was promised anything
                // from here on. Move it to quarantine, never delete it.
                let good_end = good_end.max(found.header);
                let cut = raw.len() - good_end.min(raw.len());
                let moved_later: Vec<u64> = segs.get(i + 1..).unwrap_or_default().to_vec();
                let keep_file = !found.frames.is_empty();
                let mut gone = moved_later.clone();
                if !keep_file {
                    gone.insert(0, seg);
                }
                journal.append(&gone)?;
                let q = opts
                    .quarantine
                    .dir()
                    .map_err(|e| io("cannot create quarantine in", dir, e))?
                    .to_path_buf();
                if keep_file {
                    let tail = q.join(format!("{seg:016x}.seg.torn-at-{good_end}"));
                    write_synced(&tail, raw.get(good_end..).unwrap_or_default())?;
                    file.set_len(good_end as u64)
                        .map_err(|e| io("cannot truncate", &path, e))?;
                    file.sync_all().map_err(|e| io("cannot sync", &path, e))?;
                    valid = i + 1;
                } else {
                    files.quarantine_file(seg, opts.quarantine)?;
                    valid = i;
                }
                for &s in &moved_later {
                    files.quarantine_file(s, opts.quarantine)?;
                }
                tracing::warn!(
                    segment = %path.display(),
                    at = first_bad.at,
                    problem = %first_bad.why,
                    octets_cut = cut,
                    later_segments_cut = moved_later.len(),
                    quarantine = %q.display(),
                    "the log ends in a frame torn by a crash (written after the last sync, never confirmed); cut there and moved to quarantine"
                );
                opts.actions.push(format!(
                    "{}: torn by a crash at offset {} ({}); {cut} octets and {} later segment(s) moved to quarantine",
                    path.display(),
                    first_bad.at,
                    first_bad.why,
                    moved_later.len()
                ));
                break;
            }
            if !opts.repair {
                let context = if opts.clean {
                    "after a clean shutdown, so not a torn write".to_owned()
                } else {
                    format!(
                        "with {later} segments after it, more than a crash can leave unsynced, so not a torn write"
                    )
                };
                return Err(damaged(&path, format!("{} ({context})", first_bad.why)));
            }
            // Repair: the damaged stretches go to quarantine, the good frames
            // stay (a frame holds whole records).
            let q = opts
                .quarantine
                .dir()
                .map_err(|e| io("cannot create quarantine in", dir, e))?
                .to_path_buf();
            for (range, bad) in &found.bad {
                let copy = q.join(format!("{seg:016x}.seg.damaged-at-{}", bad.at));
                let stretch = raw.get(range.clone()).unwrap_or_default();
                write_synced(&copy, stretch)?;
                lenient_frames(stretch, opts.damaged_frames);
                opts.actions.push(format!(
                    "{}: {}; {} octets moved to quarantine",
                    path.display(),
                    bad.why,
                    range.len()
                ));
            }
            if found.frames.is_empty() {
                journal.append(&[seg])?;
                std::fs::remove_file(&path).map_err(|e| io("cannot remove", &path, e))?;
                emptied.push(seg);
            } else {
                let mut data = Vec::new();
                for r in &found.frames {
                    let frame = raw.get(r.clone()).unwrap_or_default();
                    if frame != [SEAL_RECORD] {
                        data.extend_from_slice(frame);
                    }
                }
                files.rewrite_file(seg, &data)?;
                sealed.insert(seg);
            }
        }
        segs.truncate(valid);
        segs.retain(|s| !emptied.contains(s));
        // New writes go to a new segment: the newest one found is sealed
        // now, so that it is not taken for one cut short later.
        if let Some(&last) = segs.last().filter(|s| !sealed.contains(s)) {
            files.seal_file(last)?;
        }
        files.sync_dir()?;
        {
            let mut u = lock(&files.unsynced);
            u.present = segs.iter().copied().collect();
        }
        *lock(&files.journal) = Some(journal);
        Ok((files, segs, next))
    }

    /// Appends the seal to a closed segment's file and syncs it.
    fn seal_file(&self, seg: u64) -> Result<(), StoreError> {
        let path = self.path(seg);
        let mut file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io("cannot open", &path, e))?;
        file.write_all(&Self::frame(&[SEAL_RECORD])?)
            .map_err(|e| io("cannot write", &path, e))?;
        file.sync_all().map_err(|e| io("cannot sync", &path, e))
    }

    /// Moves a whole segment file into quarantine (renamed: same file system).
    fn quarantine_file(&self, seg: u64, quarantine: &mut Quarantine) -> Result<(), StoreError> {
        let path = self.path(seg);
        let q = quarantine
            .dir()
            .map_err(|e| io("cannot create quarantine in", &self.dir, e))?;
        let to = q.join(format!("{seg:016x}.seg"));
        std::fs::rename(&path, &to).map_err(|e| io("cannot move to quarantine", &path, e))
    }

    /// The log's directory.
    pub(crate) fn dir_path(&self) -> PathBuf {
        self.dir.clone()
    }

    fn path(&self, seg: u64) -> PathBuf {
        self.dir.join(format!("{seg:016x}.seg"))
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("cannot sync directory", &self.dir, e))
    }

    /// Reads a segment's data. A frame being appended while this reads may
    /// be seen incomplete: the data then ends before it. `None` if the file
    /// is gone.
    pub(crate) fn read(&self, seg: u64) -> Result<Option<Bytes>, StoreError> {
        Ok(self.read_with_layout(seg)?.map(|(data, _)| data))
    }

    /// Like [`SegmentFiles::read`], with where each frame's data starts:
    /// (offset in the returned data, offset in the file), in order.
    pub(crate) fn read_with_layout(
        &self,
        seg: u64,
    ) -> Result<Option<(Bytes, FrameLayout)>, StoreError> {
        let path = self.path(seg);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("cannot open", &path, e)),
        };
        let mut raw = Vec::new();
        (&file)
            .read_to_end(&mut raw)
            .map_err(|e| io("cannot read", &path, e))?;
        let found = scan(&raw, seg, false);
        if found.header == 0 {
            let why = found
                .bad
                .first()
                .map(|(_, b)| b.why.clone())
                .unwrap_or_default();
            return Err(StoreError::Damaged(Damage::new(&path, why)));
        }
        let mut data = BytesMut::with_capacity(raw.len());
        let mut layout = Vec::with_capacity(found.frames.len());
        for r in found.frames {
            let frame = raw.get(r.clone()).unwrap_or_default();
            if frame == [SEAL_RECORD] {
                continue;
            }
            layout.push((data.len(), r.start as u64));
            data.extend_from_slice(frame);
        }
        Ok(Some((data.freeze(), layout)))
    }

    /// Reads `len` octets at `offset` of segment `seg`'s file: one record,
    /// not the whole segment. `None` if the file is gone or shorter (the
    /// segment was compacted away meanwhile).
    pub(crate) fn read_at(
        &self,
        seg: u64,
        offset: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        use std::os::unix::fs::FileExt as _;
        let path = self.path(seg);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("cannot open", &path, e)),
        };
        // The length may come from the file itself (a record's header):
        // nothing past the file's end is allocated for.
        let size = file
            .metadata()
            .map_err(|e| io("cannot stat", &path, e))?
            .len();
        if offset.saturating_add(len as u64) > size {
            return Ok(None);
        }
        let mut buf = vec![0u8; len];
        match file.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(Some(buf)),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(io("cannot read", &path, e)),
        }
    }

    fn frame(data: &[u8]) -> Result<Vec<u8>, StoreError> {
        let len = u32::try_from(data.len())
            .map_err(|_| StoreError::Engine(format!("log frame of {} octets", data.len())))?;
        let mut buf = Vec::with_capacity(FRAME_HEADER + data.len());
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&crc32fast::hash(data).to_be_bytes());
        buf.extend_from_slice(data);
        Ok(buf)
    }

    fn create(&self, path: &Path, seg: u64) -> Result<File, StoreError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| io("cannot create", path, e))?;
        file.write_all(&header(seg))
            .map_err(|e| io("cannot write", path, e))?;
        Ok(file)
    }

    /// Appends a frame to segment `seg`, creating its file if it is new
    /// (durable at the next [`SegmentFiles::sync`]). Segments are appended
    /// to one at a time, in increasing order.
    pub(crate) fn append(&self, seg: u64, data: &[u8]) -> Result<(), StoreError> {
        self.guarded(|| self.append_frame(seg, data))
    }

    /// Seals the segment being appended to (a clean shutdown: after it the
    /// newest segment ends with its seal too). Durable at the next sync.
    pub(crate) fn seal_open(&self) -> Result<(), StoreError> {
        self.guarded(|| {
            let mut u = lock(&self.unsynced);
            if let Some((seg, file)) = u.open.as_mut() {
                file.write_all(&Self::frame(&[SEAL_RECORD])?)
                    .map_err(|e| io("cannot write", &self.path(*seg), e))?;
                u.open_dirty = true;
            }
            Ok(())
        })
    }

    /// Runs a write or sync unless one failed before; a failure stops all
    /// later ones (a half-written frame must stay the end of the log, and a
    /// sync that failed must not be followed by removals).
    fn guarded<T>(&self, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        if let Some(e) = lock(&self.unsynced).failed.clone() {
            return Err(StoreError::Engine(format!(
                "the log stopped after an earlier failure: {e}"
            )));
        }
        let result = f();
        if let Err(e) = &result {
            lock(&self.unsynced).failed = Some(e.to_string());
        }
        result
    }

    fn append_frame(&self, seg: u64, data: &[u8]) -> Result<(), StoreError> {
        let frame = Self::frame(data)?;
        let mut u = lock(&self.unsynced);
        if u.open.as_ref().is_none_or(|(s, _)| *s != seg) {
            // Moving on: the segment appended to so far is sealed first
            // (so a sync orders its seal before the new segment's frames).
            if let Some((old, file)) = u.open.as_mut() {
                file.write_all(&Self::frame(&[SEAL_RECORD])?)
                    .map_err(|e| io("cannot write", &self.path(*old), e))?;
            }
            let file = self.create(&self.path(seg), seg)?;
            u.present.insert(seg);
            if let Some((_, old)) = u.open.replace((seg, file)) {
                u.files.push(old);
            }
            u.dir_changed = true;
        }
        if let Some((_, file)) = u.open.as_mut() {
            file.write_all(&frame)
                .map_err(|e| io("cannot write", &self.path(seg), e))?;
        }
        u.open_dirty = true;
        Ok(())
    }

    /// Replaces a segment's contents atomically (temporary file, fsync, rename).
    pub(crate) fn rewrite(&self, seg: u64, data: &[u8]) -> Result<(), StoreError> {
        self.guarded(|| self.rewrite_file(seg, data))
    }

    fn rewrite_file(&self, seg: u64, data: &[u8]) -> Result<(), StoreError> {
        let tmp = self.dir.join(format!("{seg:016x}.tmp"));
        let mut file = self.create(&tmp, seg)?;
        file.write_all(&Self::frame(data)?)
            .map_err(|e| io("cannot write", &tmp, e))?;
        // A rewritten segment is an old one: sealed.
        file.write_all(&Self::frame(&[SEAL_RECORD])?)
            .map_err(|e| io("cannot write", &tmp, e))?;
        file.sync_all().map_err(|e| io("cannot sync", &tmp, e))?;
        let path = self.path(seg);
        std::fs::rename(&tmp, &path).map_err(|e| io("cannot rename", &path, e))?;
        lock(&self.unsynced).dir_changed = true;
        Ok(())
    }

    /// The number of the next sync: what is written now is durable once it
    /// completes.
    pub(crate) fn next_sync(&self) -> u64 {
        lock(&self.unsynced).synced + 1
    }

    /// Schedules a segment's removal once sync number `after` has completed
    /// (see the module docs for why removals wait).
    pub(crate) fn remove(&self, seg: u64, after: u64) {
        lock(&self.unsynced)
            .removals
            .entry(after)
            .or_default()
            .push(seg);
    }

    /// Unlinks a segment whose removal is due (journaled, its sync done).
    fn discard(&self, seg: u64) -> Result<(), StoreError> {
        let path = self.path(seg);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("cannot remove", &path, e)),
        }
    }

    /// Files written or removals waiting since the last sync.
    pub(crate) fn has_unsynced(&self) -> bool {
        let u = lock(&self.unsynced);
        !u.files.is_empty() || u.open_dirty || u.dir_changed || !u.removals.is_empty()
    }

    /// Finished files waiting for a sync.
    pub(crate) fn unsynced_files(&self) -> usize {
        lock(&self.unsynced).files.len()
    }

    /// Makes everything written so far durable, then carries out the removals
    /// that were waiting for it.
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        self.guarded(|| self.sync_all())
    }

    fn sync_all(&self) -> Result<(), StoreError> {
        let (files, open, dir_changed) = {
            let mut u = lock(&self.unsynced);
            let dirty = std::mem::take(&mut u.open_dirty);
            let open = match (&u.open, dirty) {
                (Some((_, f)), true) => Some(
                    f.try_clone()
                        .map_err(|e| io("cannot sync a segment in", &self.dir, e))?,
                ),
                _ => None,
            };
            (
                std::mem::take(&mut u.files),
                open,
                std::mem::take(&mut u.dir_changed),
            )
        };
        for f in files.iter().chain(&open) {
            f.sync_data()
                .map_err(|e| io("cannot sync a segment in", &self.dir, e))?;
        }
        if dir_changed {
            self.sync_dir()?;
        }
        let due = {
            let mut u = lock(&self.unsynced);
            u.synced += 1;
            let first_later = u.synced + 1;
            let later = u.removals.split_off(&first_later);
            std::mem::replace(&mut u.removals, later)
        };
        let due: Vec<u64> = due.into_values().flatten().collect();
        if due.is_empty() {
            return Ok(());
        }
        // Journaled (and synced) before the files go, so that open can tell
        // them from segments that went missing.
        let mut journal = lock(&self.journal);
        if let Some(j) = journal.as_mut() {
            j.append(&due)?;
        }
        for &seg in &due {
            self.discard(seg)?;
        }
        let lowest = {
            let mut u = lock(&self.unsynced);
            u.dir_changed = true;
            for seg in &due {
                u.present.remove(seg);
            }
            u.present.first().copied()
        };
        if let (Some(j), Some(lowest)) = (journal.as_mut(), lowest) {
            j.compact(&self.dir, lowest)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    /// Opens as after a crash (`clean` false) or a clean shutdown, refusing
    /// damage or repairing it; returns what a repair or cut did.
    fn open_as(
        dir: &Path,
        clean: bool,
        repair: bool,
    ) -> Result<(SegmentFiles, Vec<u64>, Vec<String>), StoreError> {
        // These tests number segments from 1; a new log starts at 0.
        if RemovalJournal::read(dir)?.is_none() {
            RemovalJournal::create(dir, 1, BTreeSet::new())?;
        }
        let mut quarantine = Quarantine::new(dir);
        let mut actions = Vec::new();
        let mut damaged_frames = Vec::new();
        let (files, segs, _) = SegmentFiles::open(
            dir,
            LogOpen {
                clean,
                clean_next: None,
                journal_required: false,
                repair,
                quarantine: &mut quarantine,
                actions: &mut actions,
                damaged_frames: &mut damaged_frames,
            },
        )?;
        Ok((files, segs, actions))
    }

    fn open(dir: &Path) -> Result<(SegmentFiles, Vec<u64>), StoreError> {
        open_as(dir, false, false).map(|(f, s, _)| (f, s))
    }

    /// The files moved to quarantine, by name.
    fn quarantined(dir: &Path) -> Vec<String> {
        let mut names = Vec::new();
        for d in std::fs::read_dir(dir.join("quarantine"))
            .into_iter()
            .flatten()
        {
            for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
                names.push(f.unwrap().file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        names
    }

    /// Corrupts the first octet of a segment file's first frame.
    fn flip_first_data_bit(path: &Path) {
        let mut raw = std::fs::read(path).unwrap();
        raw[HEADER + FRAME_HEADER] ^= 1;
        std::fs::write(path, raw).unwrap();
    }

    fn len(files: &SegmentFiles, seg: u64) -> u64 {
        std::fs::metadata(files.path(seg)).unwrap().len()
    }

    #[test]
    fn frames_append_and_read_back_as_one_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (files, segs) = open(dir.path()).unwrap();
        assert!(segs.is_empty());
        files.append(1, b"first batch, ").unwrap();
        files.append(1, b"second batch").unwrap();
        files.append(2, b"next segment").unwrap();
        assert_eq!(files.read(1).unwrap().unwrap(), "first batch, second batch");
        files.sync().unwrap();
        drop(files);
        let (files, segs) = open(dir.path()).unwrap();
        assert_eq!(segs, vec![1, 2]);
        assert_eq!(files.read(2).unwrap().unwrap(), "next segment");
    }

    #[test]
    fn a_torn_frame_ends_the_log_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = open(dir.path()).unwrap();
        files.append(1, b"kept").unwrap();
        files.append(2, b"whole").unwrap();
        let whole = len(&files, 2);
        files.append(2, b"torn by the crash").unwrap();
        files.append(3, b"written after it").unwrap();
        files.sync().unwrap();
        // The second frame of segment 2 lost its last octet (and the seal
        // written after it when 3 began).
        let torn = len(&files, 2) - (FRAME_HEADER as u64 + 1) - 1;
        OpenOptions::new()
            .write(true)
            .open(files.path(2))
            .unwrap()
            .set_len(torn)
            .unwrap();
        drop(files);
        let (files, segs) = open(dir.path()).unwrap();
        assert_eq!(segs, vec![1, 2], "3 came after the torn frame");
        assert!(!files.path(3).exists());
        let torn_at = whole;
        assert_eq!(
            quarantined(dir.path()),
            [
                format!("{:016x}.seg.torn-at-{torn_at}", 2),
                format!("{:016x}.seg", 3),
            ],
            "what was cut is kept in quarantine"
        );
        assert_eq!(
            len(&files, 2),
            whole + FRAME_HEADER as u64 + 1,
            "2 is cut after its last whole frame, then sealed as the newest"
        );
        assert_eq!(files.read(2).unwrap().unwrap(), "whole");
    }

    #[test]
    fn a_flipped_bit_fails_the_frame_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = open(dir.path()).unwrap();
        files.append(1, b"hello").unwrap();
        files.append(2, b"later").unwrap();
        files.sync().unwrap();
        flip_first_data_bit(&files.path(1));
        drop(files);
        // After a clean shutdown nothing can be torn: refused, nothing cut.
        match open_as(dir.path(), true, false) {
            Err(StoreError::Damaged(d)) => {
                assert!(d.problem.contains("fails its checksum"), "{d}");
                assert!(d.path.ends_with(format!("{:016x}.seg", 1)), "{d}");
            }
            other => panic!("{:?}", other.map(|(_, s, _)| s)),
        }
        assert!(dir.path().join(format!("{:016x}.seg", 2)).exists());
        // After a crash it is the torn tail.
        let (_, segs) = open(dir.path()).unwrap();
        assert!(
            segs.is_empty(),
            "nothing valid is left before the bad frame"
        );
        assert_eq!(
            quarantined(dir.path()).len(),
            2,
            "both files kept in quarantine"
        );
    }

    #[test]
    fn a_repair_quarantines_only_the_bad_frame() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = open(dir.path()).unwrap();
        files.append(1, b"one").unwrap();
        files.append(1, b"two").unwrap();
        files.append(1, b"three").unwrap();
        files.append(2, b"later").unwrap();
        // As a clean shutdown leaves it: the newest segment sealed too.
        files.seal_open().unwrap();
        files.sync().unwrap();
        // Damage the middle frame's data.
        let path = files.path(1);
        let mut raw = std::fs::read(&path).unwrap();
        let second = HEADER + FRAME_HEADER + 3;
        raw[second + FRAME_HEADER] ^= 0xff;
        std::fs::write(&path, raw).unwrap();
        drop(files);
        assert!(matches!(
            open_as(dir.path(), true, false),
            Err(StoreError::Damaged(_))
        ));
        let (files, segs, actions) = open_as(dir.path(), true, true).unwrap();
        assert_eq!(segs, vec![1, 2]);
        assert_eq!(files.read(1).unwrap().unwrap(), "onethree");
        assert_eq!(files.read(2).unwrap().unwrap(), "later");
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert_eq!(
            quarantined(dir.path()),
            [format!("{:016x}.seg.damaged-at-{second}", 1)]
        );
        drop(files);
        assert!(open_as(dir.path(), true, false).is_ok(), "repaired");
    }

    #[test]
    fn a_missing_segment_is_refused_and_a_removed_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = open(dir.path()).unwrap();
        for seg in 1..=4 {
            files.append(seg, b"x").unwrap();
        }
        files.sync().unwrap();
        // Segment 2 is removed by the log, 3 by hand.
        files.remove(2, files.next_sync());
        files.sync().unwrap();
        std::fs::remove_file(files.path(3)).unwrap();
        drop(files);
        match open(dir.path()) {
            Err(StoreError::Damaged(d)) => {
                assert!(d.problem.contains("1 log segment(s) missing"), "{d}");
                assert!(d.problem.contains(&format!("{:016x}.seg", 3)), "{d}");
            }
            other => panic!("{:?}", other.map(|(_, s)| s)),
        }
        let (_, segs, actions) = open_as(dir.path(), false, true).unwrap();
        assert_eq!(segs, vec![1, 4]);
        assert_eq!(actions.len(), 1);
        assert_eq!(open(dir.path()).unwrap().1, vec![1, 4], "repaired");
    }

    #[test]
    fn after_a_clean_shutdown_an_unexplained_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = open(dir.path()).unwrap();
        files.append(1, b"x").unwrap();
        files.append(2, b"y").unwrap();
        files.remove(1, files.next_sync());
        files.sync().unwrap();
        drop(files);
        // A copy of 2 put back as the removed 1.
        std::fs::copy(
            dir.path().join(format!("{:016x}.seg", 2)),
            dir.path().join(format!("{:016x}.seg", 1)),
        )
        .unwrap();
        assert!(matches!(
            open_as(dir.path(), true, false),
            Err(StoreError::Damaged(_))
        ));
    }

    #[test]
    fn a_bad_frame_deep_in_the_log_is_corruption_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = open(dir.path()).unwrap();
        let last = MAX_UNSYNCED_FILES as u64 + 3;
        for seg in 1..=last {
            files.append(seg, b"data").unwrap();
            files.sync().unwrap();
        }
        flip_first_data_bit(&files.path(1));
        drop(files);
        assert!(matches!(open(dir.path()), Err(StoreError::Damaged(_))));
        assert!(
            dir.path().join(format!("{last:016x}.seg")).exists(),
            "nothing discarded"
        );
    }

    #[test]
    fn a_failure_stops_every_later_write_sync_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = open(dir.path()).unwrap();
        files.append(1, b"x").unwrap();
        files.remove(1, files.next_sync());
        // As if a write had failed (a full disk).
        lock(&files.unsynced).failed = Some("disk full".into());
        assert!(files.append(2, b"y").is_err());
        assert!(files.sync().is_err());
        assert!(files.path(1).exists(), "no removal after a failure");
    }

    #[test]
    fn removals_wait_for_syncs_in_waves() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = open(dir.path()).unwrap();
        for seg in 1..=3 {
            files.append(seg, b"x").unwrap();
        }
        let next = files.next_sync();
        files.remove(1, next);
        files.remove(2, next + 1);
        assert!(files.path(1).exists(), "nothing goes before a sync");
        files.sync().unwrap();
        assert!(!files.path(1).exists());
        assert!(files.path(2).exists(), "the second wave waits a sync more");
        files.sync().unwrap();
        assert!(!files.path(2).exists());
        files.rewrite(3, b"y").unwrap();
        assert_eq!(files.read(3).unwrap().unwrap(), "y");
    }
}
