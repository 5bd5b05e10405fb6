//! [`MetaError`]: why a metadata command was refused or not made durable.
//! It becomes a reply code or an HTTP status in one place each (the
//! server's error module and the management API's error type).

use queue_store::StoreError;

/// Why a command was not committed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MetaError {
    /// Something it names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It contradicts what exists (a redeclare with other properties).
    #[error("{0}")]
    Conflict(String),
    /// It is not valid on its own (a bad pattern, a transient object).
    #[error("{0}")]
    Invalid(String),
    /// The store could not make it durable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The metadata log cannot commit now: in a cluster, this node is not
    /// in contact with a majority of the voting nodes. Nothing was applied
    /// anywhere.
    #[error("{0}")]
    Unavailable(String),
}
