//! [`Spill`]: where a deep queue keeps the middle of its backlog — chunks of
//! encoded queue entries in unlinked temporary files — so that a queue of ten
//! million messages holds only a window of entries in memory.
//!
//! This is memory offloading, not durability: durable entries are in the log
//! already, and the files are anonymous (`O_TMPFILE` or unlinked at once), so
//! the kernel frees them when the queue goes or the process dies.
//!
//! The bookkeeping here runs under the queue's lock and does no I/O: a chunk
//! is given its place ([`Spill::place`]) and later marked read
//! ([`Spill::consumed`]). The file I/O itself — creating a file, writing a
//! chunk, reading one back, closing a file whose chunks have all been read —
//! goes through [`SpillFile`] handles, off the lock and off the runtime's
//! workers ([`crate::Queue::spill_io`]). Chunks are placed at the end of the
//! newest file (a new one past [`FILE_TARGET`]); a file goes once it is full
//! and every chunk in it has been read.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A file takes chunks until it holds this many octets.
const FILE_TARGET: u64 = 64 << 20;

/// One spill file, created on its first write.
#[derive(Debug)]
pub(crate) struct SpillFile {
    dir: Arc<Path>,
    file: Mutex<Option<File>>,
}

impl SpillFile {
    fn new(dir: Arc<Path>) -> SpillFile {
        SpillFile {
            dir,
            file: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<File>> {
        self.file.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `data` at `off`, creating the file first if need be (blocking).
    pub(crate) fn write_at(&self, data: &[u8], off: u64) -> std::io::Result<()> {
        let mut file = self.lock();
        if file.is_none() {
            *file = Some(tempfile::tempfile_in(&self.dir)?);
        }
        match file.as_ref() {
            Some(f) => f.write_all_at(data, off),
            None => Err(std::io::Error::other("spill file not created")),
        }
    }

    /// Reads `len` octets at `off` (blocking).
    pub(crate) fn read_at(&self, off: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let file = self.lock();
        let f = file
            .as_ref()
            .ok_or_else(|| std::io::Error::other("spill chunk read before it was written"))?;
        let mut data = vec![0u8; len as usize];
        f.read_exact_at(&mut data, off)?;
        Ok(data)
    }
}

/// Where one chunk goes: its file (kept open by this handle), offset and
/// length.
#[derive(Debug, Clone)]
pub(crate) struct ChunkPlace {
    file_id: u64,
    pub(crate) file: Arc<SpillFile>,
    pub(crate) off: u64,
    pub(crate) len: u32,
}

#[derive(Debug)]
struct FileUse {
    file: Arc<SpillFile>,
    len: u64,
    unread: u32,
}

/// One queue level's spill files: where chunks go, and which files still
/// hold unread chunks.
#[derive(Debug)]
pub(crate) struct Spill {
    dir: Arc<Path>,
    files: BTreeMap<u64, FileUse>,
    next_file: u64,
    /// Files every chunk of which has been read: closed (which frees them)
    /// by whoever does the queue's spill I/O, not under its lock.
    released: Vec<Arc<SpillFile>>,
}

impl Spill {
    pub(crate) fn new(dir: Arc<Path>) -> Spill {
        Spill {
            dir,
            files: BTreeMap::new(),
            next_file: 0,
            released: Vec::new(),
        }
    }

    /// Places a chunk of `len` octets at the end of the newest file (no I/O).
    pub(crate) fn place(&mut self, len: u32) -> ChunkPlace {
        let current = self
            .files
            .last_key_value()
            .filter(|(_, f)| f.len < FILE_TARGET)
            .map(|(&id, _)| id);
        let id = current.unwrap_or_else(|| {
            self.next_file += 1;
            self.next_file - 1
        });
        let dir = &self.dir;
        let f = self.files.entry(id).or_insert_with(|| FileUse {
            file: Arc::new(SpillFile::new(dir.clone())),
            len: 0,
            unread: 0,
        });
        let place = ChunkPlace {
            file_id: id,
            file: f.file.clone(),
            off: f.len,
            len,
        };
        f.len += u64::from(len);
        f.unread += 1;
        // A full file with nothing left unread (its chunks were consumed
        // before this one was placed) goes.
        self.release_read_files();
        place
    }

    /// Marks a chunk read (or dropped): a full file whose chunks have all
    /// been read is released.
    pub(crate) fn consumed(&mut self, place: &ChunkPlace) {
        if let Some(f) = self.files.get_mut(&place.file_id) {
            f.unread = f.unread.saturating_sub(1);
        }
        self.release_read_files();
    }

    fn release_read_files(&mut self) {
        let newest = self.files.last_key_value().map(|(&id, _)| id);
        let done: Vec<u64> = self
            .files
            .iter()
            .filter(|&(&id, f)| f.unread == 0 && (Some(id) != newest || f.len >= FILE_TARGET))
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            if let Some(f) = self.files.remove(&id) {
                self.released.push(f.file);
            }
        }
    }

    /// Files to close, off the queue's lock.
    pub(crate) fn take_released(&mut self) -> Vec<Arc<SpillFile>> {
        std::mem::take(&mut self.released)
    }

    /// Octets placed in files still held.
    #[cfg(test)]
    pub(crate) fn placed_bytes(&self) -> u64 {
        self.files.values().map(|f| f.len).sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn chunks_come_back_and_read_files_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::new(Arc::from(dir.path()));
        let a = spill.place(11);
        let b = spill.place(6);
        a.file.write_at(b"first chunk", a.off).unwrap();
        b.file.write_at(b"second", b.off).unwrap();
        assert_eq!(a.file.read_at(a.off, a.len).unwrap(), b"first chunk");
        spill.consumed(&a);
        assert_eq!(spill.placed_bytes(), 17);
        assert_eq!(b.file.read_at(b.off, b.len).unwrap(), b"second");
        spill.consumed(&b);
        assert!(
            spill.take_released().is_empty(),
            "the newest file takes more chunks"
        );
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "spill files are anonymous"
        );
    }

    #[test]
    fn a_full_file_goes_once_its_chunks_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::new(Arc::from(dir.path()));
        let big = spill.place(FILE_TARGET as u32);
        let next = spill.place(4);
        assert_ne!(big.file_id, next.file_id, "a full file takes no more");
        spill.consumed(&big);
        assert_eq!(spill.take_released().len(), 1);
        assert_eq!(spill.placed_bytes(), 4);
    }

    #[test]
    fn a_chunk_is_not_read_before_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::new(Arc::from(dir.path()));
        let a = spill.place(4);
        assert!(a.file.read_at(a.off, a.len).is_err());
    }
}
