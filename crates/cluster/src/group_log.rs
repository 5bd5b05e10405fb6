//! [`GroupLog`]: one Raft group's log and vote as openraft stores them, on
//! the node's shared [`RaftWal`] (every group of the node appends to the same
//! file, so one `fdatasync` covers many groups' appends). Each group type
//! says how its records are encoded ([`LogFormat`]): the metadata group in
//! JSON (what its data directories already hold), replicated queues in
//! bincode (their entries carry message bodies). [`SnapshotFile`] is where
//! a group's state machine keeps its last snapshot.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogReader, RaftTypeConfig, StorageError, StorageIOError, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::identity::NodeInfo;
use crate::raft_wal::RaftWal;

/// How a group type's log records are encoded.
pub trait LogFormat:
    RaftTypeConfig<NodeId = u64, Node = NodeInfo, Entry = Entry<Self>> + Sized
{
    /// Encodes a record.
    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String>;
    /// Decodes a record.
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String>;
}

/// Group `group` of the node's WAL, as the log of a group of type `C`.
pub struct GroupLog<C> {
    wal: RaftWal,
    group: u64,
    _format: PhantomData<fn() -> C>,
}

impl<C> GroupLog<C> {
    /// Group `group` of `wal`.
    pub fn new(wal: RaftWal, group: u64) -> Self {
        GroupLog {
            wal,
            group,
            _format: PhantomData,
        }
    }
}

impl<C: LogFormat> GroupLog<C> {
    /// The index of the last entry this replica knows committed (what it
    /// last saved of it; `None` before any, or if it cannot be read).
    pub fn committed_index(&self) -> Option<u64> {
        let mark = self.wal.committed(self.group)?;
        let committed: Option<LogId<u64>> = C::decode(&mark).ok()?;
        committed.map(|id| id.index)
    }
}

impl<C> Clone for GroupLog<C> {
    fn clone(&self) -> Self {
        GroupLog::new(self.wal.clone(), self.group)
    }
}

impl<C> Debug for GroupLog<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupLog")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

// openraft's error type is large; it is what the trait returns.
#[allow(clippy::result_large_err)]
fn read<C: LogFormat, T: DeserializeOwned>(b: &[u8]) -> Result<T, StorageError<u64>> {
    C::decode(b).map_err(|e| StorageIOError::read_logs(&std::io::Error::other(e)).into())
}

fn io(e: String) -> std::io::Error {
    std::io::Error::other(e)
}

impl<C: LogFormat> RaftLogReader<C> for GroupLog<C>
where
    Entry<C>: Serialize + DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<C>>, StorageError<u64>> {
        let mut out = Vec::new();
        for b in self.wal.entries(self.group, range) {
            out.push(read::<C, Entry<C>>(&b)?);
        }
        Ok(out)
    }
}

impl<C: LogFormat> RaftLogStorage<C> for GroupLog<C>
where
    Entry<C>: Serialize + DeserializeOwned,
{
    type LogReader = GroupLog<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<u64>> {
        let g = self.wal.group(self.group);
        let last_purged_log_id: Option<LogId<u64>> = match &g.purged {
            Some((_, id)) => Some(read::<C, _>(id)?),
            None => None,
        };
        let last_log_id = match g.entries.last_key_value() {
            Some((_, e)) => Some(read::<C, Entry<C>>(e)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        let b = C::encode(vote).map_err(|e| StorageIOError::write_vote(&io(e)))?;
        self.wal
            .save_vote(self.group, Bytes::from(b))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        match self.wal.group(self.group).vote {
            Some(v) => Ok(Some(
                C::decode(&v).map_err(|e| StorageIOError::read_vote(&io(e)))?,
            )),
            None => Ok(None),
        }
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        let b = C::encode(&committed).map_err(|e| StorageIOError::write(&io(e)))?;
        self.wal.save_committed(self.group, Bytes::from(b));
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        match self.wal.group(self.group).committed {
            Some(c) => Ok(C::decode(&c).map_err(|e| StorageIOError::read(&io(e)))?),
            None => Ok(None),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<C>> + Send,
        I::IntoIter: Send,
    {
        let mut encoded = Vec::new();
        for e in entries {
            let b =
                C::encode(&e).map_err(|err| StorageIOError::write_log_entry(e.log_id, &io(err)))?;
            encoded.push((e.log_id.index, Bytes::from(b)));
        }
        let last = encoded.last().map_or(0, |e| e.0);
        tracing::trace!(target: "latency", group = self.group, last, n = encoded.len(), "log append");
        self.wal.append(
            self.group,
            &encoded,
            Box::new(move |r| {
                tracing::trace!(target: "latency", last, "log flushed");
                callback.log_io_completed(r)
            }),
        );
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.wal
            .truncate(self.group, log_id.index)
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let b = C::encode(&log_id).map_err(|e| StorageIOError::write_logs(&io(e)))?;
        self.wal
            .purge(self.group, log_id.index, Bytes::from(b))
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

/// A group's last snapshot on disk: one file, replaced durably (temporary
/// file, fsync, rename, directory fsync) before openraft purges the entries
/// it covers. It starts with [`SNAPSHOT_MAGIC`] and the CRC-32 of the rest,
/// so a damaged snapshot is refused rather than loaded (a file without the
/// magic was written before it had one, and is read as it is).
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    path: PathBuf,
}

/// What a checksummed snapshot file starts with.
const SNAPSHOT_MAGIC: &[u8; 8] = b"WSNAP\x001\n";

impl SnapshotFile {
    /// The snapshot kept at `path`.
    pub fn new(path: PathBuf) -> SnapshotFile {
        SnapshotFile { path }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last snapshot written, if there is one.
    /// A snapshot that fails its checksum is an error (`InvalidData`).
    pub fn read(&self) -> std::io::Result<Option<Vec<u8>>> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(rest) = bytes.strip_prefix(SNAPSHOT_MAGIC.as_slice()) else {
            return Ok(Some(bytes));
        };
        let (crc, body) = rest.split_at_checked(4).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the snapshot is shorter than its header (damaged)",
            )
        })?;
        let crc = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(body) != crc {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the snapshot ({} octets) fails its checksum (damaged)",
                    body.len()
                ),
            ));
        }
        Ok(Some(body.to_vec()))
    }

    /// Replaces it with `bytes`, durably, off the runtime's workers.
    pub async fn write(&self, bytes: Vec<u8>) -> Result<(), StorageError<u64>> {
        let mut framed = Vec::with_capacity(SNAPSHOT_MAGIC.len() + 4 + bytes.len());
        framed.extend_from_slice(SNAPSHOT_MAGIC);
        framed.extend_from_slice(&crc32fast::hash(&bytes).to_be_bytes());
        framed.extend_from_slice(&bytes);
        let bytes = framed;
        let path = self.path.clone();
        let tmp = path.with_extension("snapshot.tmp");
        tokio::task::spawn_blocking(move || crate::identity::write_durably(&tmp, &path, &bytes))
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &io(e.to_string())))?
            .map_err(|e| StorageIOError::write_snapshot(None, &e).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_snapshot_comes_back_as_written_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = SnapshotFile::new(dir.path().join("q.snapshot"));
        assert_eq!(file.read().unwrap(), None);
        file.write(b"the state".to_vec()).await.unwrap();
        assert_eq!(file.read().unwrap(), Some(b"the state".to_vec()));
        // One octet of the state goes bad.
        let mut raw = std::fs::read(file.path()).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0x20;
        std::fs::write(file.path(), &raw).unwrap();
        let e = file.read().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("fails its checksum"), "{e}");
        // One written before snapshots had a checksum is read as it is.
        std::fs::write(file.path(), b"{\"older\": true}").unwrap();
        assert_eq!(file.read().unwrap(), Some(b"{\"older\": true}".to_vec()));
    }
}
