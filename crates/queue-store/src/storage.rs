//! The storage engine behind a small trait, and its sled implementation.
//!
//! Everything Warren persists goes through [`Storage`]: a batch of [`Write`]s
//! applied together, a `sync` that returns only when they are on disk, and the
//! reads recovery and paging need. sled (the stable 0.34 line) implements it
//! with four trees:
//!
//! | tree | key | value |
//! |---|---|---|
//! | `meta` | `schema`, `clean` | schema version; clean-shutdown marker |
//! | `definitions` | kind octet ‖ name | a field table (see [`crate::definitions`]) |
//! | `messages` | message id (u64 BE) | [`Message::encode`] |
//! | `index` | queue id (u64 BE) ‖ seq (u64 BE) | [`IndexEntry`] (26 octets) |
//!
//! Big-endian keys make each queue's index iterate in FIFO order.

use std::path::Path;

use amqp_codec::FieldTable;
use bytes::{Bytes, BytesMut};

use crate::definitions::DefKind;
use crate::error::StoreError;
use crate::message::{Message, MessageId};

/// How long [`SledStorage::open`] waits for a locked data directory.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Version of the on-disk layout this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// One queue's record of one message: where it is and its per-queue state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexEntry {
    /// The stored message.
    pub message: MessageId,
    /// When it expires (ms since the Unix epoch), 0 if never.
    pub expires_at: u64,
    /// Times it was returned to the queue unacknowledged.
    pub delivery_count: u32,
    /// Body size (for `x-max-length-bytes` without loading the body).
    pub size: u32,
    /// Priority (0 unless the queue is a priority queue).
    pub priority: u8,
    /// Whether it has been delivered at least once.
    pub delivered: bool,
}

impl IndexEntry {
    const LEN: usize = 26;

    fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&self.message.0.to_be_bytes());
        b[8..16].copy_from_slice(&self.expires_at.to_be_bytes());
        b[16..20].copy_from_slice(&self.delivery_count.to_be_bytes());
        b[20..24].copy_from_slice(&self.size.to_be_bytes());
        b[24] = self.priority;
        b[25] = u8::from(self.delivered);
        b
    }

    fn decode(b: &[u8]) -> Option<IndexEntry> {
        let b: &[u8; Self::LEN] = b.try_into().ok()?;
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(x)
        };
        let u32_at = |i: usize| {
            let mut x = [0u8; 4];
            x.copy_from_slice(&b[i..i + 4]);
            u32::from_be_bytes(x)
        };
        Some(IndexEntry {
            message: MessageId(u64_at(0)),
            expires_at: u64_at(8),
            delivery_count: u32_at(16),
            size: u32_at(20),
            priority: b[24],
            delivered: b[25] != 0,
        })
    }
}

/// One write in a batch.
#[derive(Debug, Clone)]
pub enum Write {
    /// Store a message body (once, however many queues hold it).
    PutMessage(std::sync::Arc<Message>),
    /// Delete a message no queue references any more.
    DeleteMessage(MessageId),
    /// Add or update a queue's index entry.
    PutIndex {
        /// Queue id.
        queue: u64,
        /// Position in the queue.
        seq: u64,
        /// The entry.
        entry: IndexEntry,
    },
    /// Remove a queue's index entry (acknowledged, dropped, expired).
    DeleteIndex {
        /// Queue id.
        queue: u64,
        /// Position in the queue.
        seq: u64,
    },
    /// Remove a deleted queue's whole index.
    DeleteQueueIndex {
        /// Queue id.
        queue: u64,
    },
    /// Store a definition (vhost, user, durable exchange, ...).
    PutDefinition {
        /// What it defines.
        kind: DefKind,
        /// Its name (unique within the kind).
        key: Bytes,
        /// Its fields.
        value: FieldTable,
    },
    /// Delete a definition.
    DeleteDefinition {
        /// What it defined.
        kind: DefKind,
        /// Its name.
        key: Bytes,
    },
}

/// A storage engine.
pub trait Storage: Send + Sync + 'static {
    /// Applies writes in order. They may not be durable until [`Storage::sync`].
    fn apply(&self, writes: &[Write]) -> Result<(), StoreError>;
    /// Returns once everything applied so far is on disk (fsync).
    fn sync(&self) -> Result<(), StoreError>;
    /// Reads one message.
    fn message(&self, id: MessageId) -> Result<Option<Message>, StoreError>;
    /// Every stored message id.
    fn message_ids(&self) -> Result<Vec<MessageId>, StoreError>;
    /// Every index entry of every queue, in (queue, seq) order.
    fn index(&self) -> Result<Vec<(u64, u64, IndexEntry)>, StoreError>;
    /// Every definition.
    fn definitions(&self) -> Result<Vec<(DefKind, Bytes, FieldTable)>, StoreError>;
    /// Reads a metadata value.
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes (or with `None` deletes) a metadata value.
    fn set_meta(&self, key: &str, value: Option<&[u8]>) -> Result<(), StoreError>;
}

/// sled-backed [`Storage`].
#[derive(Debug)]
pub struct SledStorage {
    db: sled::Db,
    meta: sled::Tree,
    definitions: sled::Tree,
    messages: sled::Tree,
    index: sled::Tree,
}

fn index_key(queue: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&queue.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn def_key(kind: DefKind, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(kind as u8);
    k.extend_from_slice(key);
    k
}

impl SledStorage {
    /// Opens (or creates) the database in `dir`, waiting up to 15 s for a
    /// directory lock still held by a store of this process that was just dropped.
    pub fn open(dir: &Path) -> Result<SledStorage, StoreError> {
        let config = sled::Config::new()
            .path(dir)
            // Warren decides when to fsync (group commit); sled's own timer
            // still bounds how long acks and other unsynced writes wait.
            .flush_every_ms(Some(500))
            .cache_capacity(64 << 20);
        // sled locks the directory. Another process holding it is a real
        // conflict; but a store this process just dropped can keep the lock for
        // a while (sled's I/O threads let go of the file last, seconds later on
        // a loaded machine), so a held lock is waited for before giving up.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let mut warned = false;
        let db = loop {
            match config.open() {
                // sled reports a held lock as an `Other` I/O error that
                // wraps the WouldBlock; only its text tells.
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    if !warned {
                        tracing::warn!(dir = %dir.display(), "data directory is locked; waiting for it");
                        warned = true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => break other?,
            }
        };
        Ok(SledStorage {
            meta: db.open_tree("meta")?,
            definitions: db.open_tree("definitions")?,
            messages: db.open_tree("messages")?,
            index: db.open_tree("index")?,
            db,
        })
    }
}

impl Storage for SledStorage {
    fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        for w in writes {
            match w {
                Write::PutMessage(m) => {
                    self.messages
                        .insert(m.id.0.to_be_bytes(), m.encode().as_ref())?;
                }
                Write::DeleteMessage(id) => {
                    self.messages.remove(id.0.to_be_bytes())?;
                }
                Write::PutIndex { queue, seq, entry } => {
                    self.index
                        .insert(index_key(*queue, *seq), &entry.encode())?;
                }
                Write::DeleteIndex { queue, seq } => {
                    self.index.remove(index_key(*queue, *seq))?;
                }
                Write::DeleteQueueIndex { queue } => {
                    let mut batch = sled::Batch::default();
                    for key in self.index.scan_prefix(queue.to_be_bytes()).keys() {
                        batch.remove(key?);
                    }
                    self.index.apply_batch(batch)?;
                }
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
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn message(&self, id: MessageId) -> Result<Option<Message>, StoreError> {
        match self.messages.get(id.0.to_be_bytes())? {
            None => Ok(None),
            Some(v) => Message::decode(id, Bytes::copy_from_slice(&v)).map(Some),
        }
    }

    fn message_ids(&self) -> Result<Vec<MessageId>, StoreError> {
        let mut ids = Vec::new();
        for key in self.messages.iter().keys() {
            let key = key?;
            let id: [u8; 8] = key.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                what: "message key",
                key: format!("{key:?}"),
            })?;
            ids.push(MessageId(u64::from_be_bytes(id)));
        }
        Ok(ids)
    }

    fn index(&self) -> Result<Vec<(u64, u64, IndexEntry)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.index.iter() {
            let (k, v) = kv?;
            let corrupt = || StoreError::Corrupt {
                what: "index entry",
                key: format!("{k:?}"),
            };
            let k: [u8; 16] = k.as_ref().try_into().map_err(|_| corrupt())?;
            let mut q = [0u8; 8];
            let mut s = [0u8; 8];
            q.copy_from_slice(&k[..8]);
            s.copy_from_slice(&k[8..]);
            let entry = IndexEntry::decode(&v).ok_or_else(corrupt)?;
            out.push((u64::from_be_bytes(q), u64::from_be_bytes(s), entry));
        }
        Ok(out)
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
    use super::*;

    #[test]
    fn index_entry_round_trips() {
        let e = IndexEntry {
            message: MessageId(u64::MAX - 1),
            expires_at: 1_700_000_000_000,
            delivery_count: 3,
            size: 100,
            priority: 9,
            delivered: true,
        };
        assert_eq!(IndexEntry::decode(&e.encode()), Some(e));
        assert_eq!(IndexEntry::decode(&[0; 5]), None);
    }

    #[test]
    fn index_keys_sort_by_queue_then_seq() {
        assert!(index_key(1, 255) < index_key(1, 256));
        assert!(index_key(1, u64::MAX) < index_key(2, 0));
    }
}
