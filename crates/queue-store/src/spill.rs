//! [`Spill`]: where a deep queue keeps the middle of its backlog — chunks of
//! encoded queue entries in unlinked temporary files — so that a queue of ten
//! million messages holds only a window of entries in memory.
//!
//! This is memory offloading, not durability: durable entries are in the log
//! already, and the files are anonymous (`O_TMPFILE` or unlinked at once), so
//! the kernel frees them when the queue goes or the process dies. Chunks are
//! appended to the newest file (a new one past [`FILE_TARGET`]); a file goes
//! once every chunk in it has been read back.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// A file takes chunks until it holds this many octets.
const FILE_TARGET: u64 = 64 << 20;

/// Where one chunk was written.
#[derive(Debug)]
pub(crate) struct SpilledChunk {
    file: u64,
    off: u64,
    len: u32,
}

#[derive(Debug)]
struct SpillFile {
    file: File,
    len: u64,
    unread: u32,
}

/// One queue's spill files.
#[derive(Debug)]
pub(crate) struct Spill {
    dir: Arc<Path>,
    files: BTreeMap<u64, SpillFile>,
    next_file: u64,
}

impl Spill {
    pub(crate) fn new(dir: Arc<Path>) -> Spill {
        Spill {
            dir,
            files: BTreeMap::new(),
            next_file: 0,
        }
    }

    /// Appends a chunk.
    pub(crate) fn write(&mut self, data: &[u8]) -> std::io::Result<SpilledChunk> {
        let len = u32::try_from(data.len()).map_err(std::io::Error::other)?;
        let current = self
            .files
            .last_key_value()
            .filter(|(_, f)| f.len < FILE_TARGET)
            .map(|(&id, _)| id);
        let id = match current {
            Some(id) => id,
            None => {
                let file = tempfile::tempfile_in(&self.dir)?;
                let id = self.next_file;
                self.next_file += 1;
                self.files.insert(
                    id,
                    SpillFile {
                        file,
                        len: 0,
                        unread: 0,
                    },
                );
                id
            }
        };
        let f = self
            .files
            .get_mut(&id)
            .ok_or_else(|| std::io::Error::other("spill file vanished"))?;
        f.file.write_all_at(data, f.len)?;
        let chunk = SpilledChunk {
            file: id,
            off: f.len,
            len,
        };
        f.len += u64::from(len);
        f.unread += 1;
        Ok(chunk)
    }

    /// Reads a chunk back (each chunk is read once); a file whose chunks have
    /// all been read is closed, which frees it.
    pub(crate) fn read(&mut self, chunk: &SpilledChunk) -> std::io::Result<Vec<u8>> {
        let newest = self.files.last_key_value().map(|(&id, _)| id);
        let f = self
            .files
            .get_mut(&chunk.file)
            .ok_or_else(|| std::io::Error::other("spill file already released"))?;
        let mut data = vec![0u8; chunk.len as usize];
        f.file.read_exact_at(&mut data, chunk.off)?;
        f.unread = f.unread.saturating_sub(1);
        if f.unread == 0 && (Some(chunk.file) != newest || f.len >= FILE_TARGET) {
            self.files.remove(&chunk.file);
        } else if f.unread == 0 {
            // The newest file, emptied: start it over.
            f.file.set_len(0)?;
            f.len = 0;
        }
        Ok(data)
    }

    /// Octets held in spill files.
    #[cfg(test)]
    pub(crate) fn disk_bytes(&self) -> u64 {
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
        let a = spill.write(b"first chunk").unwrap();
        let b = spill.write(b"second").unwrap();
        assert_eq!(spill.read(&a).unwrap(), b"first chunk");
        assert_eq!(spill.disk_bytes(), 17);
        assert_eq!(spill.read(&b).unwrap(), b"second");
        assert_eq!(spill.disk_bytes(), 0, "an emptied file starts over");
        let c = spill.write(b"third").unwrap();
        assert_eq!(spill.read(&c).unwrap(), b"third");
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "spill files are anonymous"
        );
    }
}
