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
    /// Part of the data directory is damaged or missing in a way a crash
    /// cannot explain: the store refuses to open rather than lose data
    /// silently (a repair moves the damage to quarantine).
    #[error("data directory damaged: {0}")]
    Damaged(crate::damage::Damage),
    /// Another process holds the data directory.
    #[error("data directory {dir} is in use by another Warren{}", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked {
        /// The data directory.
        dir: std::path::PathBuf,
        /// The process holding it, if it wrote its pid.
        pid: Option<u32>,
    },
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

/// What was wrong with a queue argument, printed as RabbitMQ 3.10 prints it
/// (recorded in `tests/data/rabbitmq_3_10_queue_args.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgProblem {
    /// A number was expected; RabbitMQ's name of the type received.
    ExpectedInteger(&'static str),
    /// The value has a type the argument does not accept.
    UnacceptableType(&'static str),
    /// A number that must not be negative was.
    Negative(i64),
    /// `x-expires` of 0.
    Zero,
    /// A duration over RabbitMQ's ten-year maximum.
    TooLarge(i64),
    /// `x-max-priority` over 255.
    MaxValueExceeded(i64),
    /// An `x-overflow` string that is not a known mode.
    InvalidOverflow,
    /// An unknown `x-queue-mode`.
    UnsupportedQueueMode(String),
    /// An unknown or unsupported `x-queue-type`.
    UnsupportedQueueType(String),
    /// `x-queue-leader-locator` other than `client-local` or `balanced`.
    InvalidQueueLocator,
    /// `x-dead-letter-strategy` other than `at-most-once` or `at-least-once`.
    InvalidDlxStrategy,
    /// `x-dead-letter-routing-key` without `x-dead-letter-exchange`.
    RoutingKeyButNoDlx,
}

impl std::fmt::Display for ArgProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArgProblem::ExpectedInteger(t) => write!(f, "\"expected integer, got {t}\""),
            ArgProblem::UnacceptableType(t) => write!(f, "{{unacceptable_type,{t}}}"),
            ArgProblem::Negative(v) => write!(f, "{{value_negative,{v}}}"),
            ArgProblem::Zero => write!(f, "{{value_zero,0}}"),
            ArgProblem::TooLarge(v) => write!(f, "{{value_too_large,{v}}}"),
            ArgProblem::MaxValueExceeded(v) => write!(f, "{{max_value_exceeded,{v}}}"),
            ArgProblem::InvalidOverflow => write!(f, "invalid_overflow"),
            ArgProblem::UnsupportedQueueMode(m) => write!(f, "\"unsupported queue mode '{m}'\""),
            ArgProblem::UnsupportedQueueType(t) => write!(f, "\"unsupported queue type '{t}'\""),
            ArgProblem::RoutingKeyButNoDlx => write!(f, "routing_key_but_no_dlx_defined"),
            ArgProblem::InvalidQueueLocator => write!(f, "invalid_queue_locator_arg"),
            ArgProblem::InvalidDlxStrategy => write!(f, "invalid_dlx_strategy"),
        }
    }
}

/// An invalid queue declaration: 406 PRECONDITION_FAILED.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    /// An argument's value is wrong.
    #[error("invalid arg '{arg}' for queue '{queue}' in vhost '{vhost}': {problem}")]
    Invalid {
        /// The argument's name.
        arg: &'static str,
        /// Queue name.
        queue: String,
        /// Vhost name.
        vhost: String,
        /// What was wrong.
        problem: ArgProblem,
    },
    /// `x-dead-letter-exchange` of a type other than long string.
    #[error("invalid type '{type_name}' for arg '{arg}' in queue '{queue}' in vhost '{vhost}'")]
    InvalidType {
        /// The argument's name.
        arg: &'static str,
        /// RabbitMQ's name of the type received.
        type_name: &'static str,
        /// Queue name.
        queue: String,
        /// Vhost name.
        vhost: String,
    },
    /// An argument the queue type does not take (a quorum queue's
    /// `x-max-priority`, say); `queue_type` is RabbitMQ's module name.
    #[error(
        "invalid arg '{arg}' for queue '{queue}' in vhost '{vhost}' of queue type {queue_type}"
    )]
    NotForQueueType {
        /// The argument's name.
        arg: &'static str,
        /// Queue name.
        queue: String,
        /// Vhost name.
        vhost: String,
        /// `rabbit_quorum_queue`.
        queue_type: &'static str,
    },
    /// A queue property the queue type does not allow (`x-queue-type: quorum`
    /// must be durable, not exclusive, not auto-delete).
    #[error("invalid property '{property}' for queue '{queue}' in vhost '{vhost}'")]
    InvalidProperty {
        /// `non-durable`, `exclusive-owner` or `auto-delete`.
        property: &'static str,
        /// Queue name.
        queue: String,
        /// Vhost name.
        vhost: String,
    },
}

impl ArgError {
    /// Always 406.
    pub fn reply_code(&self) -> u16 {
        reply_code::PRECONDITION_FAILED
    }

    /// The problem with an argument's value, if that is what this is.
    pub fn problem(&self) -> Option<&ArgProblem> {
        match self {
            ArgError::Invalid { problem, .. } => Some(problem),
            _ => None,
        }
    }
}
