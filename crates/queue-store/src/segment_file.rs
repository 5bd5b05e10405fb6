//! [`SegmentFiles`]: the message log's segments as files of their own, one per
//! segment, in `<data dir>/log/`. The log lives outside sled so that the
//! operating system's page cache, not the broker's heap, holds what was
//! written: sled keeps every value it was given in memory, which for a deep
//! backlog was most of the broker's resident memory.
//!
//! A file is `<segment number, 16 hex digits>.seg`: a 16-octet header
//! (`WRNSEG01`, data length u32 BE, CRC-32 of the data u32 BE) and the data.
//!
//! ## Crash safety
//!
//! - Writes are not synced one by one: [`SegmentFiles::sync`] fsyncs every file
//!   written since the last sync, in order, then the directory. Nothing a
//!   caller was promised durable is newer than the last sync.
//! - So after a crash the only segments that can be torn are newer than every
//!   synced one. At open the first segment whose header or checksum does not
//!   match ends the log: it and every later segment are removed (none of them
//!   was synced, so no commit point covered them).
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
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use crate::error::StoreError;

const MAGIC: &[u8; 8] = b"WRNSEG01";
const HEADER_LEN: usize = 16;

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Engine(format!("{what} {}: {e}", path.display()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Default)]
struct Unsynced {
    /// Files written since the last sync, oldest first.
    files: Vec<File>,
    /// Whether the directory changed (created, renamed, removed) since then.
    dir_changed: bool,
    /// Removals waiting for a sync, by the number of the sync they wait for.
    removals: BTreeMap<u64, Vec<u64>>,
    /// Syncs completed.
    synced: u64,
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
            let file = File::open(&path).map_err(|e| io("cannot open", &path, e))?;
            if files.check(seg, &file)?.is_none() {
                valid = i;
                break;
            }
            file.sync_all().map_err(|e| io("cannot sync", &path, e))?;
        }
        if let Some(torn) = segs.get(valid..).filter(|t| !t.is_empty()) {
            tracing::warn!(
                first = torn.first().copied().unwrap_or_default(),
                segments = torn.len(),
                "log ends in segments that were never synced (torn by a crash); discarding them"
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

    /// Reads and verifies a whole segment: `None` if its header or checksum
    /// does not match (torn).
    fn check(&self, seg: u64, file: &File) -> Result<Option<Bytes>, StoreError> {
        let path = self.path(seg);
        let mut header = [0u8; HEADER_LEN];
        match file.read_exact_at(&mut header, 0) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(io("cannot read", &path, e)),
        }
        let field = |i: usize| {
            let mut x = [0u8; 4];
            x.copy_from_slice(&header[i..i + 4]);
            u32::from_be_bytes(x)
        };
        let (len, crc) = (field(8) as usize, field(12));
        let size = file
            .metadata()
            .map_err(|e| io("cannot stat", &path, e))?
            .len();
        if &header[..8] != MAGIC || size != (HEADER_LEN + len) as u64 {
            return Ok(None);
        }
        let mut data = BytesMut::zeroed(len);
        file.read_exact_at(&mut data, HEADER_LEN as u64)
            .map_err(|e| io("cannot read", &path, e))?;
        if crc32fast::hash(&data) != crc {
            return Ok(None);
        }
        Ok(Some(data.freeze()))
    }

    /// Reads a whole segment. A segment the log knows of that is missing or
    /// torn is corruption.
    pub(crate) fn read(&self, seg: u64) -> Result<Option<Bytes>, StoreError> {
        let path = self.path(seg);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("cannot open", &path, e)),
        };
        match self.check(seg, &file)? {
            Some(data) => Ok(Some(data)),
            None => Err(StoreError::Corrupt {
                what: "log segment",
                key: format!("{seg} (header or checksum)"),
            }),
        }
    }

    fn write_file(&self, path: &Path, data: &[u8]) -> Result<File, StoreError> {
        let len = u32::try_from(data.len())
            .map_err(|_| StoreError::Engine(format!("segment of {} octets", data.len())))?;
        let mut buf = Vec::with_capacity(HEADER_LEN + data.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&crc32fast::hash(data).to_be_bytes());
        buf.extend_from_slice(data);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| io("cannot create", path, e))?;
        file.write_all(&buf)
            .map_err(|e| io("cannot write", path, e))?;
        Ok(file)
    }

    /// Writes a new segment (durable at the next [`SegmentFiles::sync`]).
    pub(crate) fn write(&self, seg: u64, data: &[u8]) -> Result<(), StoreError> {
        let file = self.write_file(&self.path(seg), data)?;
        let mut u = lock(&self.unsynced);
        u.files.push(file);
        u.dir_changed = true;
        Ok(())
    }

    /// Replaces a segment's contents atomically (temporary file, fsync, rename).
    pub(crate) fn rewrite(&self, seg: u64, data: &[u8]) -> Result<(), StoreError> {
        let tmp = self.dir.join(format!("{seg:016x}.tmp"));
        let file = self.write_file(&tmp, data)?;
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
        !u.files.is_empty() || u.dir_changed || !u.removals.is_empty()
    }

    /// Makes everything written so far durable, then carries out the removals
    /// that were waiting for it.
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        let (files, dir_changed) = {
            let mut u = lock(&self.unsynced);
            (
                std::mem::take(&mut u.files),
                std::mem::take(&mut u.dir_changed),
            )
        };
        for f in &files {
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

    #[test]
    fn torn_tail_segments_are_discarded_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (files, segs) = SegmentFiles::open(dir.path()).unwrap();
        assert!(segs.is_empty());
        for seg in 1..=4 {
            files
                .write(seg, format!("segment {seg}").as_bytes())
                .unwrap();
        }
        files.sync().unwrap();
        // Segment 3 torn mid-write: short by one octet.
        let path = files.path(3);
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        drop(files);
        let (files, segs) = SegmentFiles::open(dir.path()).unwrap();
        assert_eq!(segs, vec![1, 2], "3 is torn, and 4 came after it");
        assert!(!files.path(4).exists());
        assert_eq!(files.read(2).unwrap().unwrap(), "segment 2");
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = SegmentFiles::open(dir.path()).unwrap();
        files.write(1, b"hello").unwrap();
        files.sync().unwrap();
        let path = files.path(1);
        let mut raw = std::fs::read(&path).unwrap();
        raw[HEADER_LEN] ^= 1;
        std::fs::write(&path, raw).unwrap();
        assert!(matches!(files.read(1), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn removals_wait_for_syncs_in_waves() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = SegmentFiles::open(dir.path()).unwrap();
        for seg in 1..=3 {
            files.write(seg, b"x").unwrap();
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
