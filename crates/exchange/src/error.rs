//! Routing-table errors. Each knows the AMQP reply code RabbitMQ answers with
//! and whether it closes the channel (all but an unknown exchange type, which
//! RabbitMQ treats as a connection error). Texts follow RabbitMQ 3.10's wording
//! as recorded in `tests/data/rabbitmq_3_10_exchange_errors.md`, without the
//! `NOT_FOUND - ` style prefix, which the server adds.

use amqp_codec::reply_code;

/// What the routing table refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// 404: the exchange does not exist.
    #[error("no exchange '{exchange}' in vhost '{vhost}'")]
    ExchangeNotFound {
        /// Exchange name.
        exchange: String,
        /// Vhost name.
        vhost: String,
    },
    /// 404: the queue does not exist.
    #[error("no queue '{queue}' in vhost '{vhost}'")]
    QueueNotFound {
        /// Queue name.
        queue: String,
        /// Vhost name.
        vhost: String,
    },
    /// 403: declare, delete, bind or unbind on the default exchange.
    #[error("operation not permitted on the default exchange")]
    DefaultExchange,
    /// 403: a client declared an exchange whose name starts with `amq.`.
    #[error("exchange name '{0}' contains reserved prefix 'amq.*'")]
    ReservedName(String),
    /// 403: a client deleted a pre-declared `amq.*` exchange.
    #[error("deletion of system exchange '{exchange}' in vhost '{vhost}' not allowed")]
    SystemExchange {
        /// Exchange name.
        exchange: String,
        /// Vhost name.
        vhost: String,
    },
    /// 403: a publish to an internal exchange.
    #[error("cannot publish to internal exchange '{exchange}' in vhost '{vhost}'")]
    Internal {
        /// Exchange name.
        exchange: String,
        /// Vhost name.
        vhost: String,
    },
    /// 406: a redeclare whose properties differ from the existing exchange's.
    #[error(
        "inequivalent arg '{arg}' for exchange '{exchange}' in vhost '{vhost}': received {received} but current is {current}"
    )]
    Inequivalent {
        /// Which property differs (`type`, `durable`, `auto_delete`, `internal`, `alternate-exchange`).
        arg: &'static str,
        /// Exchange name.
        exchange: String,
        /// Vhost name.
        vhost: String,
        /// What the client sent, phrased as RabbitMQ does (`'topic'`, `none`, ...).
        received: String,
        /// What the exchange has, phrased as RabbitMQ does.
        current: String,
    },
    /// 406: `exchange.delete` with if-unused on an exchange that is the source of bindings.
    #[error("exchange '{exchange}' in vhost '{vhost}' in use")]
    InUse {
        /// Exchange name.
        exchange: String,
        /// Vhost name.
        vhost: String,
    },
    /// 406: an argument of the wrong type.
    #[error(
        "invalid type '{type_name}' for arg '{arg}' in exchange '{exchange}' in vhost '{vhost}'"
    )]
    InvalidArgType {
        /// Argument name.
        arg: &'static str,
        /// RabbitMQ's name of the type received.
        type_name: &'static str,
        /// Exchange name.
        exchange: String,
        /// Vhost name.
        vhost: String,
    },
    /// 406: a headers binding with an `x-match` that is not a known string.
    #[error(
        "Invalid x-match field value <<\"{0}\">>; expected all, any, all-with-x, or any-with-x"
    )]
    InvalidXMatchValue(String),
    /// 406: a headers binding with an `x-match` that is not a string.
    #[error("Invalid x-match field type {0}; expected longstr")]
    InvalidXMatchType(String),
    /// 503 (connection error): an exchange type Warren does not know.
    #[error("unknown exchange type '{0}'")]
    UnknownType(String),
    /// 503 (connection error): the empty exchange type.
    #[error("invalid exchange type ''")]
    EmptyType,
}

impl ExchangeError {
    /// The reply code for `channel.close` / `connection.close`.
    pub fn reply_code(&self) -> u16 {
        match self {
            ExchangeError::ExchangeNotFound { .. } | ExchangeError::QueueNotFound { .. } => {
                reply_code::NOT_FOUND
            }
            ExchangeError::DefaultExchange
            | ExchangeError::ReservedName(_)
            | ExchangeError::SystemExchange { .. }
            | ExchangeError::Internal { .. } => reply_code::ACCESS_REFUSED,
            ExchangeError::Inequivalent { .. }
            | ExchangeError::InUse { .. }
            | ExchangeError::InvalidArgType { .. }
            | ExchangeError::InvalidXMatchValue(_)
            | ExchangeError::InvalidXMatchType(_) => reply_code::PRECONDITION_FAILED,
            ExchangeError::UnknownType(_) | ExchangeError::EmptyType => reply_code::COMMAND_INVALID,
        }
    }

    /// Whether RabbitMQ closes the whole connection for this error.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            ExchangeError::UnknownType(_) | ExchangeError::EmptyType
        )
    }
}
