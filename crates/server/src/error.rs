//! [`AmqpError`]: every refusal the broker sends a client, with its scope
//! (channel or connection), reply code, text and the failing method's ids.
//! Errors of the lower crates are mapped to it here and nowhere else.

use amqp_codec::{CodecError, reply_code};
use exchange::ExchangeError;
use queue_store::{ArgError, StoreError};

/// Whether an error closes the channel or the whole connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Soft error: `channel.close`.
    Channel,
    /// Hard error: `connection.close`.
    Connection,
}

/// An error to report to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {name} - {text}")]
pub struct AmqpError {
    /// Channel or connection.
    pub scope: Scope,
    /// Reply code.
    pub code: u16,
    /// The reply code's name (`NOT_FOUND`, ...).
    pub name: &'static str,
    /// Human-readable text (without the `NAME - ` prefix).
    pub text: String,
    /// Class of the failing method (0 if none).
    pub class_id: u16,
    /// Method id of the failing method (0 if none).
    pub method_id: u16,
}

fn name_of(code: u16) -> &'static str {
    match code {
        reply_code::CONTENT_TOO_LARGE => "CONTENT_TOO_LARGE",
        reply_code::NO_ROUTE => "NO_ROUTE",
        reply_code::NO_CONSUMERS => "NO_CONSUMERS",
        reply_code::CONNECTION_FORCED => "CONNECTION_FORCED",
        reply_code::INVALID_PATH => "INVALID_PATH",
        reply_code::ACCESS_REFUSED => "ACCESS_REFUSED",
        reply_code::NOT_FOUND => "NOT_FOUND",
        reply_code::RESOURCE_LOCKED => "RESOURCE_LOCKED",
        reply_code::PRECONDITION_FAILED => "PRECONDITION_FAILED",
        reply_code::FRAME_ERROR => "FRAME_ERROR",
        reply_code::SYNTAX_ERROR => "SYNTAX_ERROR",
        reply_code::COMMAND_INVALID => "COMMAND_INVALID",
        reply_code::CHANNEL_ERROR => "CHANNEL_ERROR",
        reply_code::UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        reply_code::RESOURCE_ERROR => "RESOURCE_ERROR",
        reply_code::NOT_ALLOWED => "NOT_ALLOWED",
        reply_code::NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        _ => "INTERNAL_ERROR",
    }
}

impl AmqpError {
    fn new(scope: Scope, code: u16, text: impl Into<String>) -> Self {
        AmqpError {
            scope,
            code,
            name: name_of(code),
            text: text.into(),
            class_id: 0,
            method_id: 0,
        }
    }

    /// Attaches the failing method's ids.
    pub fn on(mut self, class_id: u16, method_id: u16) -> Self {
        self.class_id = class_id;
        self.method_id = method_id;
        self
    }

    /// The reply text as sent: `NAME - text`, cut to the 255 octets a short
    /// string holds (on a character boundary), as RabbitMQ does.
    pub fn reply_text(&self) -> String {
        let mut t = format!("{} - {}", self.name, self.text);
        if t.len() > 255 {
            let mut end = 255;
            while !t.is_char_boundary(end) {
                end -= 1;
            }
            t.truncate(end);
        }
        t
    }

    /// A channel error with `code` (as another node of the cluster
    /// answered it).
    pub fn channel(code: u16, text: impl Into<String>) -> Self {
        Self::new(Scope::Channel, code, text)
    }

    /// 404, channel.
    pub fn not_found(text: impl Into<String>) -> Self {
        Self::new(Scope::Channel, reply_code::NOT_FOUND, text)
    }

    /// 403, channel.
    pub fn access_refused(text: impl Into<String>) -> Self {
        Self::new(Scope::Channel, reply_code::ACCESS_REFUSED, text)
    }

    /// 506, channel.
    pub fn resource_error(text: impl Into<String>) -> Self {
        Self::new(Scope::Channel, reply_code::RESOURCE_ERROR, text)
    }

    /// 405, channel.
    pub fn resource_locked(text: impl Into<String>) -> Self {
        Self::new(Scope::Channel, reply_code::RESOURCE_LOCKED, text)
    }

    /// 406, channel.
    pub fn precondition_failed(text: impl Into<String>) -> Self {
        Self::new(Scope::Channel, reply_code::PRECONDITION_FAILED, text)
    }

    /// 540, connection.
    pub fn not_implemented(text: impl Into<String>) -> Self {
        Self::new(Scope::Connection, reply_code::NOT_IMPLEMENTED, text)
    }

    /// 503, connection.
    pub fn command_invalid(text: impl Into<String>) -> Self {
        Self::new(Scope::Connection, reply_code::COMMAND_INVALID, text)
    }

    /// 504, connection.
    pub fn channel_error(text: impl Into<String>) -> Self {
        Self::new(Scope::Connection, reply_code::CHANNEL_ERROR, text)
    }

    /// 505, connection.
    pub fn unexpected_frame(text: impl Into<String>) -> Self {
        Self::new(Scope::Connection, reply_code::UNEXPECTED_FRAME, text)
    }

    /// 501, connection.
    pub fn frame_error(text: impl Into<String>) -> Self {
        Self::new(Scope::Connection, reply_code::FRAME_ERROR, text)
    }

    /// 530, connection.
    pub fn not_allowed(text: impl Into<String>) -> Self {
        Self::new(Scope::Connection, reply_code::NOT_ALLOWED, text)
    }

    /// 403, connection (failed login, vhost access).
    pub fn access_refused_connection(text: impl Into<String>) -> Self {
        Self::new(Scope::Connection, reply_code::ACCESS_REFUSED, text)
    }

    /// 320, connection (broker shutting down, connection closed by an operator).
    pub fn connection_forced(text: impl Into<String>) -> Self {
        Self::new(Scope::Connection, reply_code::CONNECTION_FORCED, text)
    }

    /// 541, connection.
    pub fn internal(text: impl Into<String>) -> Self {
        Self::new(Scope::Connection, reply_code::INTERNAL_ERROR, text)
    }
}

impl From<CodecError> for AmqpError {
    fn from(e: CodecError) -> Self {
        let scope = if e.is_connection_error() {
            Scope::Connection
        } else {
            Scope::Channel
        };
        let error = Self::new(scope, e.reply_code(), e.to_string());
        match e.method_ids() {
            Some((class_id, method_id)) => error.on(class_id, method_id),
            None => error,
        }
    }
}

impl From<ExchangeError> for AmqpError {
    fn from(e: ExchangeError) -> Self {
        let scope = if e.is_connection_error() {
            Scope::Connection
        } else {
            Scope::Channel
        };
        Self::new(scope, e.reply_code(), e.to_string())
    }
}

impl From<ArgError> for AmqpError {
    fn from(e: ArgError) -> Self {
        Self::new(Scope::Channel, e.reply_code(), e.to_string())
    }
}

impl From<StoreError> for AmqpError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store failure");
        Self::new(Scope::Connection, e.reply_code(), e.to_string())
    }
}

impl From<crate::meta::MetaError> for AmqpError {
    /// A refused metadata command: what it names is missing (404) or it
    /// contradicts what exists (406); a store failure closes the connection.
    fn from(e: crate::meta::MetaError) -> Self {
        use crate::meta::MetaError;
        match e {
            MetaError::NotFound(text) => AmqpError::not_found(text),
            MetaError::Conflict(text) | MetaError::Invalid(text) => {
                AmqpError::precondition_failed(text)
            }
            MetaError::Store(e) => e.into(),
            // A cluster node cut off from the majority refuses metadata
            // changes with a channel error, so its connections go on serving
            // the queues it hosts. (RabbitMQ's minority nodes pause or time
            // out instead; 506 is the spec's channel-level "resources
            // unavailable" code.)
            MetaError::Unavailable(text) => AmqpError::resource_error(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_text_has_rabbitmq_prefix_and_fits_a_short_string() {
        let e = AmqpError::not_found("no queue 'q' in vhost '/'").on(50, 10);
        assert_eq!(e.reply_text(), "NOT_FOUND - no queue 'q' in vhost '/'");
        assert_eq!((e.class_id, e.method_id, e.scope), (50, 10, Scope::Channel));
        let long = AmqpError::precondition_failed("é".repeat(300));
        assert!(long.reply_text().len() <= 255);
    }
}
