//! Errors of the queue store: [`StoreError`] for the storage engine and the
//! files on disk, [`ArgError`] for queue arguments a client got wrong (which the
//! server answers with 406 PRECONDITION_FAILED in RabbitMQ's wording).

use amqp_codec::reply_code;

/// Storage failures. None of these is the client's fault; the server logs them
/// and answers 541 INTERNAL_ERROR where a client is waiting.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The storage engine failed (I/O error, full disk, ...).
    #[error("storage engine: {0}")]
    Engine(String),
    /// A record on disk could not be decoded.
    #[error("corrupt {what} record (key {key})")]
    Corrupt {
        /// What kind of record.
        what: &'static str,
        /// Its key, printable.
        key: String,
    },
    /// The data directory was written by an incompatible version.
    #[error("data directory has schema version {found}, this build reads version {expected}")]
    SchemaMismatch {
        /// Version on disk.
        found: u32,
        /// Version this build understands.
        expected: u32,
    },
    /// The store was closed (broker shutting down).
    #[error("store is closed")]
    Closed,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Engine(e.to_string())
    }
}

impl StoreError {
    /// The reply code for a client waiting on this operation.
    pub fn reply_code(&self) -> u16 {
        reply_code::INTERNAL_ERROR
    }
}

/// What was wrong with a queue argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgProblem {
    /// The value has a type the argument does not accept (RabbitMQ's type name).
    UnacceptableType(&'static str),
    /// A number that must not be negative was.
    Negative(i64),
    /// A number that must be positive was zero or negative.
    NotPositive(i64),
    /// A number above the argument's maximum.
    TooLarge(i64),
    /// A string value the argument does not know.
    UnknownValue(String),
}

impl std::fmt::Display for ArgProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArgProblem::UnacceptableType(t) => write!(f, "{{unacceptable_type,{t}}}"),
            ArgProblem::Negative(v) => write!(f, "{{value_negative,{v}}}"),
            ArgProblem::NotPositive(v) => write!(f, "{{value_zero_or_less,{v}}}"),
            ArgProblem::TooLarge(v) => write!(f, "{{value_too_large,{v}}}"),
            ArgProblem::UnknownValue(v) => write!(f, "{{unknown_value,<<\"{v}\">>}}"),
        }
    }
}

/// An invalid queue argument: 406 PRECONDITION_FAILED.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid arg '{arg}' for queue '{queue}' in vhost '{vhost}': {problem}")]
pub struct ArgError {
    /// The argument's name.
    pub arg: &'static str,
    /// Queue name.
    pub queue: String,
    /// Vhost name.
    pub vhost: String,
    /// What was wrong.
    pub problem: ArgProblem,
}

impl ArgError {
    /// Always 406.
    pub fn reply_code(&self) -> u16 {
        reply_code::PRECONDITION_FAILED
    }
}
