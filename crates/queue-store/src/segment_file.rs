//! [`SegmentFiles`]: the message log's segments as files of their own, one per
//! segment, in `<data dir>/log/`. The log lives outside sled so that the
//! operating system's page cache, not the broker's heap, holds what was
//! written: sled keeps every value it was given in memory, which for a deep
//! backlog was most of the broker's resident memory.
//!
//! A file is `<segment number, 16 hex digits>.seg`: the magic `WRNSEG02`, then
//! frames, each a length (u32 BE), a CRC-32 of its data (u32 BE) and the data.
//! The segment being filled gets a frame per batch the writer applies (so a
//! file holds ~256 KiB however small the batches); its data is the frames'
//! data back to back.
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

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use crate::error::StoreError;

const MAGIC: &[u8; 8] = b"WRNSEG02";
const FRAME_HEADER: usize = 8;

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
}

/// The log's segment files.
pub(crate) struct SegmentFiles {
    dir: PathBuf,
    unsynced: Mutex<Unsynced>,
}

impl SegmentFiles {
    /// Opens (creating it if needed) the directory and returns the segments
    /// that make up the log, in order. Torn segments past the last sync and
    /// leftover temporary files are removed.
    pub(crate) fn open(dir: &Path) -> Result<(SegmentFiles, Vec<u64>), StoreError> {
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
                _ if name.ends_with(".tmp") => {
                    let path = entry.path();
                    std::fs::remove_file(&path).map_err(|e| io("cannot remove", &path, e))?;
                }
                _ => {}
            }
        }
        segs.sort_unstable();
        let files = SegmentFiles {
            dir: dir.to_path_buf(),
            unsynced: Mutex::new(Unsynced::default()),
        };
        // Everything found is made durable before anything is removed on its
        // account (a previous run may have written it without syncing).
        let mut valid = segs.len();
        for (i, &seg) in segs.iter().enumerate() {
            let path = files.path(seg);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io("cannot open", &path, e))?;
            let (_, good, complete) = files.frames(seg, &file)?;
            if !complete {
                tracing::warn!(
                    segment = seg,
                    valid_octets = good,
                    "log segment torn by a crash; cutting it there"
                );
                if good > MAGIC.len() as u64 {
                    file.set_len(good)
                        .map_err(|e| io("cannot truncate", &path, e))?;
                    file.sync_all().map_err(|e| io("cannot sync", &path, e))?;
                    valid = i + 1;
                } else {
                    valid = i;
                }
                break;
            }
            file.sync_all().map_err(|e| io("cannot sync", &path, e))?;
        }
        if segs.len().saturating_sub(valid) > MAX_UNSYNCED_FILES + 1 {
            return Err(StoreError::Corrupt {
                what: "log segment",
                key: format!(
                    "{} (a bad frame with {} segments after it: not a torn tail)",
                    segs.get(valid.saturating_sub(1))
                        .copied()
                        .unwrap_or_default(),
                    segs.len() - valid
                ),
            });
        }
        if let Some(torn) = segs.get(valid..).filter(|t| !t.is_empty()) {
            tracing::warn!(
                first = torn.first().copied().unwrap_or_default(),
                segments = torn.len(),
                "log ends in segments written after the last sync; discarding them"
            );
            for &seg in torn {
                let path = files.path(seg);
                std::fs::remove_file(&path).map_err(|e| io("cannot remove", &path, e))?;
            }
            segs.truncate(valid);
        }
        files.sync_dir()?;
        Ok((files, segs))
    }

    #[cfg(test)]
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, seg: u64) -> PathBuf {
        self.dir.join(format!("{seg:016x}.seg"))
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("cannot sync directory", &self.dir, e))
    }

    /// Reads a segment's frames: their data back to back, the octets of the
    /// file up to the end of the last good frame, and whether the file ended
    /// there (false: a short or corrupt frame follows, or a bad magic).
    fn frames(&self, seg: u64, file: &File) -> Result<(BytesMut, u64, bool), StoreError> {
        let path = self.path(seg);
        let mut raw = Vec::new();
        let mut f = file;
        f.read_to_end(&mut raw)
            .map_err(|e| io("cannot read", &path, e))?;
        let mut data = BytesMut::with_capacity(raw.len());
        if raw.get(..MAGIC.len()) != Some(MAGIC.as_slice()) {
            return Ok((data, 0, false));
        }
        let mut pos = MAGIC.len();
        while pos < raw.len() {
            let Some(header) = raw.get(pos..pos + FRAME_HEADER) else {
                return Ok((data, pos as u64, false));
            };
            let field = |i: usize| {
                let mut x = [0u8; 4];
                x.copy_from_slice(&header[i..i + 4]);
                u32::from_be_bytes(x)
            };
            let (len, crc) = (field(0) as usize, field(4));
            let start = pos + FRAME_HEADER;
            // (An empty frame is never written: zeros are not a frame.)
            match raw.get(start..start.saturating_add(len)) {
                Some(frame) if len > 0 && crc32fast::hash(frame) == crc => {
                    data.extend_from_slice(frame);
                    pos = start + len;
                }
                _ => return Ok((data, pos as u64, false)),
            }
        }
        Ok((data, pos as u64, true))
    }

    /// Reads a segment's data. A frame being appended while this reads may
    /// be seen incomplete: the data then ends before it. `None` if the file
    /// is gone.
    pub(crate) fn read(&self, seg: u64) -> Result<Option<Bytes>, StoreError> {
        let path = self.path(seg);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("cannot open", &path, e)),
        };
        let (data, good, _) = self.frames(seg, &file)?;
        if good == 0 {
            return Err(StoreError::Corrupt {
                what: "log segment",
                key: format!("{seg} (not a segment file)"),
            });
        }
        Ok(Some(data.freeze()))
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

    fn create(&self, path: &Path) -> Result<File, StoreError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| io("cannot create", path, e))?;
        file.write_all(MAGIC)
            .map_err(|e| io("cannot write", path, e))?;
        Ok(file)
    }

    /// Appends a frame to segment `seg`, creating its file if it is new
    /// (durable at the next [`SegmentFiles::sync`]). Segments are appended
    /// to one at a time, in increasing order.
    pub(crate) fn append(&self, seg: u64, data: &[u8]) -> Result<(), StoreError> {
        self.guarded(|| self.append_frame(seg, data))
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
            let file = self.create(&self.path(seg))?;
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
        let mut file = self.create(&tmp)?;
        file.write_all(&Self::frame(data)?)
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

    /// Removes a segment at once: only for segments that were never synced
    /// and are not needed (nothing can depend on them).
    pub(crate) fn discard(&self, seg: u64) -> Result<(), StoreError> {
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
        for seg in due.into_values().flatten() {
            self.discard(seg)?;
            lock(&self.unsynced).dir_changed = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    /// Corrupts the first octet of a segment file's first frame.
    fn flip_first_data_bit(path: &Path) {
        let mut raw = std::fs::read(path).unwrap();
        raw[MAGIC.len() + FRAME_HEADER] ^= 1;
        std::fs::write(path, raw).unwrap();
    }

    fn len(files: &SegmentFiles, seg: u64) -> u64 {
        std::fs::metadata(files.path(seg)).unwrap().len()
    }

    #[test]
    fn frames_append_and_read_back_as_one_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (files, segs) = SegmentFiles::open(dir.path()).unwrap();
        assert!(segs.is_empty());
        files.append(1, b"first batch, ").unwrap();
        files.append(1, b"second batch").unwrap();
        files.append(2, b"next segment").unwrap();
        assert_eq!(files.read(1).unwrap().unwrap(), "first batch, second batch");
        files.sync().unwrap();
        drop(files);
        let (files, segs) = SegmentFiles::open(dir.path()).unwrap();
        assert_eq!(segs, vec![1, 2]);
        assert_eq!(files.read(2).unwrap().unwrap(), "next segment");
    }

    #[test]
    fn a_torn_frame_ends_the_log_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = SegmentFiles::open(dir.path()).unwrap();
        files.append(1, b"kept").unwrap();
        files.append(2, b"whole").unwrap();
        let whole = len(&files, 2);
        files.append(2, b"torn by the crash").unwrap();
        files.append(3, b"written after it").unwrap();
        files.sync().unwrap();
        // The second frame of segment 2 lost its last octet.
        let torn = len(&files, 2) - 1;
        OpenOptions::new()
            .write(true)
            .open(files.path(2))
            .unwrap()
            .set_len(torn)
            .unwrap();
        drop(files);
        let (files, segs) = SegmentFiles::open(dir.path()).unwrap();
        assert_eq!(segs, vec![1, 2], "3 came after the torn frame");
        assert!(!files.path(3).exists());
        assert_eq!(len(&files, 2), whole, "2 is cut after its last whole frame");
        assert_eq!(files.read(2).unwrap().unwrap(), "whole");
    }

    #[test]
    fn a_flipped_bit_fails_the_frame_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = SegmentFiles::open(dir.path()).unwrap();
        files.append(1, b"hello").unwrap();
        files.append(2, b"later").unwrap();
        files.sync().unwrap();
        flip_first_data_bit(&files.path(1));
        drop(files);
        let (_, segs) = SegmentFiles::open(dir.path()).unwrap();
        assert!(
            segs.is_empty(),
            "nothing valid is left before the bad frame"
        );
    }

    #[test]
    fn a_bad_frame_deep_in_the_log_is_corruption_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = SegmentFiles::open(dir.path()).unwrap();
        let last = MAX_UNSYNCED_FILES as u64 + 3;
        for seg in 1..=last {
            files.append(seg, b"data").unwrap();
            files.sync().unwrap();
        }
        flip_first_data_bit(&files.path(1));
        drop(files);
        assert!(matches!(
            SegmentFiles::open(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(
            dir.path().join(format!("{last:016x}.seg")).exists(),
            "nothing discarded"
        );
    }

    #[test]
    fn a_failure_stops_every_later_write_sync_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = SegmentFiles::open(dir.path()).unwrap();
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
        let (files, _) = SegmentFiles::open(dir.path()).unwrap();
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
