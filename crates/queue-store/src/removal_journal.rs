//! [`RemovalJournal`]: the log's record of which segment numbers were
//! removed on purpose (`log/removed`), so that open can tell a segment the
//! log reclaimed from one that went missing (deleted by hand, lost by a
//! disk). Without it a missing middle segment looked like any reclaimed one
//! and its messages vanished without a word.
//!
//! The file is the magic `WRNRMV01`, then entries of a segment number (u64
//! BE) and a CRC-32 of those 8 octets (u32 BE). The first entry is the
//! *floor*: every number below it is accounted for (removed, or never used).
//! The others name removed segments at or above it. A removal is appended
//! and fsync'd before the segment's file is unlinked, so a crash can leave a
//! journaled segment still present (harmless) but never a segment gone and
//! not journaled. The journal is rewritten (temporary file, fsync, rename)
//! with a higher floor when it grows long.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read as _, Write as _};
use std::path::{Path, PathBuf};

use crate::damage::Damage;
use crate::error::StoreError;

const MAGIC: &[u8; 8] = b"WRNRMV01";
const ENTRY: usize = 12;

/// Entries past which the journal is rewritten with a higher floor.
const COMPACT_AFTER: usize = 4096;

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Engine(format!("{what} {}: {e}", path.display()))
}

fn entry(seg: u64) -> [u8; ENTRY] {
    let mut e = [0u8; ENTRY];
    e[..8].copy_from_slice(&seg.to_be_bytes());
    e[8..].copy_from_slice(&crc32fast::hash(&seg.to_be_bytes()).to_be_bytes());
    e
}

/// The journal, open for appending.
#[derive(Debug)]
pub(crate) struct RemovalJournal {
    path: PathBuf,
    file: File,
    floor: u64,
    removed: BTreeSet<u64>,
}

impl RemovalJournal {
    /// The journal's path in a log directory.
    pub(crate) fn path_in(dir: &Path) -> PathBuf {
        dir.join("removed")
    }

    /// Reads the journal: `None` if there is none. A damaged entry (not a
    /// torn last one) is damage.
    pub(crate) fn read(dir: &Path) -> Result<Option<(u64, BTreeSet<u64>)>, StoreError> {
        let path = Self::path_in(dir);
        let mut raw = Vec::new();
        match File::open(&path) {
            Ok(mut f) => f
                .read_to_end(&mut raw)
                .map_err(|e| io("cannot read", &path, e))?,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("cannot open", &path, e)),
        };
        if raw.get(..MAGIC.len()) != Some(MAGIC.as_slice()) {
            return Err(StoreError::Damaged(Damage::new(
                &path,
                "not a removal journal (bad magic)",
            )));
        }
        let body = raw.get(MAGIC.len()..).unwrap_or_default();
        let mut numbers = Vec::with_capacity(body.len() / ENTRY);
        for (i, e) in body.chunks(ENTRY).enumerate() {
            if e.len() < ENTRY {
                // A torn append: the removal it would have named never happened.
                break;
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&e[..8]);
            let mut c = [0u8; 4];
            c.copy_from_slice(&e[8..]);
            if crc32fast::hash(&n) != u32::from_be_bytes(c) {
                return Err(StoreError::Damaged(Damage::new(
                    &path,
                    format!(
                        "entry {i} (offset {}) fails its checksum",
                        MAGIC.len() + i * ENTRY
                    ),
                )));
            }
            numbers.push(u64::from_be_bytes(n));
        }
        let Some((&floor, rest)) = numbers.split_first() else {
            return Err(StoreError::Damaged(Damage::new(
                &path,
                "the removal journal is empty (no floor)",
            )));
        };
        Ok(Some((
            floor,
            rest.iter().copied().filter(|&n| n >= floor).collect(),
        )))
    }

    /// Writes a new journal atomically and opens it for appending.
    pub(crate) fn create(
        dir: &Path,
        floor: u64,
        removed: BTreeSet<u64>,
    ) -> Result<RemovalJournal, StoreError> {
        let path = Self::path_in(dir);
        let tmp = dir.join("removed.tmp");
        let mut buf = Vec::with_capacity(MAGIC.len() + ENTRY * (removed.len() + 1));
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&entry(floor));
        for &n in removed.range(floor..) {
            buf.extend_from_slice(&entry(n));
        }
        let mut f = File::create(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
        f.write_all(&buf).map_err(|e| io("cannot write", &tmp, e))?;
        f.sync_all().map_err(|e| io("cannot sync", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|e| io("cannot rename", &path, e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("cannot sync directory", dir, e))?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io("cannot open", &path, e))?;
        Ok(RemovalJournal {
            path,
            file,
            floor,
            removed: removed.into_iter().filter(|&n| n >= floor).collect(),
        })
    }

    /// Records removals durably (before their files are unlinked).
    pub(crate) fn append(&mut self, segs: &[u64]) -> Result<(), StoreError> {
        if segs.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(ENTRY * segs.len());
        for &s in segs {
            buf.extend_from_slice(&entry(s));
            self.removed.insert(s);
        }
        self.file
            .write_all(&buf)
            .map_err(|e| io("cannot write", &self.path, e))?;
        self.file
            .sync_data()
            .map_err(|e| io("cannot sync", &self.path, e))
    }

    /// Rewrites the journal with the floor raised to `lowest_present` (every
    /// segment below it is gone) once it has grown long.
    pub(crate) fn compact(&mut self, dir: &Path, lowest_present: u64) -> Result<(), StoreError> {
        if self.removed.len() < COMPACT_AFTER || lowest_present <= self.floor {
            return Ok(());
        }
        let removed = std::mem::take(&mut self.removed);
        *self = Self::create(dir, lowest_present, removed)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    #[test]
    fn removals_survive_reopen_and_a_torn_append_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = RemovalJournal::create(dir.path(), 3, BTreeSet::from([1, 4])).unwrap();
        j.append(&[5, 7]).unwrap();
        drop(j);
        // Half an entry: a crash in the middle of an append.
        let path = RemovalJournal::path_in(dir.path());
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&entry(9)[..5]).unwrap();
        let (floor, removed) = RemovalJournal::read(dir.path()).unwrap().unwrap();
        assert_eq!(floor, 3);
        assert_eq!(removed, BTreeSet::from([4, 5, 7]), "1 is below the floor");
    }

    #[test]
    fn a_flipped_bit_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = RemovalJournal::create(dir.path(), 0, BTreeSet::new()).unwrap();
        j.append(&[1, 2]).unwrap();
        let path = RemovalJournal::path_in(dir.path());
        let mut raw = std::fs::read(&path).unwrap();
        raw[MAGIC.len() + ENTRY + 3] ^= 0x10;
        std::fs::write(&path, raw).unwrap();
        assert!(matches!(
            RemovalJournal::read(dir.path()),
            Err(StoreError::Damaged(_))
        ));
    }

    #[test]
    fn compaction_raises_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = RemovalJournal::create(dir.path(), 0, BTreeSet::new()).unwrap();
        let segs: Vec<u64> = (0..COMPACT_AFTER as u64 + 10).collect();
        j.append(&segs).unwrap();
        j.compact(dir.path(), COMPACT_AFTER as u64).unwrap();
        let (floor, removed) = RemovalJournal::read(dir.path()).unwrap().unwrap();
        assert_eq!(floor, COMPACT_AFTER as u64);
        assert_eq!(removed.len(), 10);
    }
}
