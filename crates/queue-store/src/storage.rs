//! The storage engine behind a small trait: the [`Storage`] trait, the
//! [`Write`]s it applies, and the [`IndexEntry`] a queue keeps per message.
//!
//! Everything Warren persists goes through [`Storage`]: a batch of [`Write`]s
//! applied together, a `sync` that returns only when they are on disk, and the
//! reads recovery and paging need. [`crate::SegmentLogStorage`] (in `segment_log.rs`)
//! implements it on sled; another engine can be swapped in behind the trait.

use amqp_codec::FieldTable;
use bytes::Bytes;

use crate::definitions::DefKind;
use crate::error::StoreError;
use crate::message::{Message, MessageId};

/// Version of the on-disk layout this build reads and writes.
pub const SCHEMA_VERSION: u32 = 3;

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
    pub(crate) const LEN: usize = 26;

    pub(crate) fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&self.message.0.to_be_bytes());
        b[8..16].copy_from_slice(&self.expires_at.to_be_bytes());
        b[16..20].copy_from_slice(&self.delivery_count.to_be_bytes());
        b[20..24].copy_from_slice(&self.size.to_be_bytes());
        b[24] = self.priority;
        b[25] = u8::from(self.delivered);
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Option<IndexEntry> {
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

/// The stored messages as recovery sees them.
#[derive(Debug, Default)]
pub struct MessageCensus {
    /// Messages no index entry references (to delete).
    pub orphans: Vec<MessageId>,
    /// Messages some index entry references.
    pub referenced: usize,
    /// The highest stored message id (0: none).
    pub max_id: u64,
    /// The highest counter stored, by node tag (see [`MessageId`]).
    pub max_counters: std::collections::HashMap<u16, u64>,
}

/// One write in a batch.
#[derive(Debug, Clone)]
pub enum Write {
    /// Take a reference on a message for a queue entry: its body is stored
    /// with the first, later ones only count.
    PutMessage(std::sync::Arc<Message>),
    /// Drop a reference: the last one deletes the body (as does dropping the
    /// reference of a body nothing references: an orphan found at open).
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
    /// Whether another [`Storage::sync`] has work even with nothing new
    /// applied (an engine whose removals take several syncs says so, and the
    /// store's writer syncs again once idle).
    fn needs_sync(&self) -> bool {
        false
    }
    /// Reads one message (a random read: the engine reads that record).
    fn message(&self, id: MessageId) -> Result<Option<Message>, StoreError>;
    /// Reads messages that are likely stored together (a queue's next
    /// paged bodies, in order): the engine may read whole segments.
    fn messages_in_order(&self, ids: &[MessageId]) -> Vec<Result<Option<Message>, StoreError>> {
        ids.iter().map(|id| self.message(*id)).collect()
    }
    /// Every stored message id.
    fn message_ids(&self) -> Result<Vec<MessageId>, StoreError>;
    /// Every index entry of every queue, in (queue, seq) order.
    fn index(&self) -> Result<Vec<(u64, u64, IndexEntry)>, StoreError>;
    /// The same, by queue id, each queue's in seq order (what recovery uses).
    fn queue_indexes(
        &self,
    ) -> Result<std::collections::HashMap<u64, Vec<(u64, IndexEntry)>>, StoreError>;
    /// What recovery needs to know of the stored messages.
    fn message_census(&self) -> Result<MessageCensus, StoreError>;
    /// Every definition.
    fn definitions(&self) -> Result<Vec<(DefKind, Bytes, FieldTable)>, StoreError>;
    /// Reads a metadata value.
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes (or with `None` deletes) a metadata value.
    fn set_meta(&self, key: &str, value: Option<&[u8]>) -> Result<(), StoreError>;
    /// Records a clean shutdown (everything is synced; nothing is written
    /// after this). An engine may record what the next open should find.
    fn mark_clean(&self) -> Result<(), StoreError> {
        self.set_meta("clean", Some(&[1]))
    }
    /// Whether the previous run shut down cleanly; forgets it, so that a
    /// crash from now on is seen as one.
    fn take_clean_shutdown(&self) -> Result<bool, StoreError> {
        let clean = self.meta("clean")?.is_some();
        self.set_meta("clean", None)?;
        Ok(clean)
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
}
