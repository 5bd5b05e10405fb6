//! The codec's one error type.
//!
//! Every decode error knows the AMQP reply code a broker must close with
//! ([`CodecError::reply_code`]) and whether it is a connection error (all of
//! them, except a content body over the configured maximum, which RabbitMQ
//! treats as a channel error). The server maps these to `connection.close` /
//! `channel.close` in one place; nothing here decides policy.

use crate::methods::reply_code;

/// What exactly was wrong inside a method payload, content header or field table.
///
/// This is also the error type handed through `nom`'s parsers: a `complete`
/// nom parser that runs out of input reports [`Malformed::Truncated`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The payload ended before all fields were read.
    #[error("truncated")]
    Truncated,
    /// Bytes were left over after the last field.
    #[error("{0} trailing octets")]
    TrailingBytes(usize),
    /// A short string was not valid UTF-8.
    #[error("short string is not valid UTF-8")]
    InvalidUtf8,
    /// A field table or array value had an unknown type octet.
    #[error("unknown field type {:?}", char::from(*.0))]
    UnknownFieldType(u8),
    /// Field tables/arrays were nested deeper than [`crate::table::MAX_NESTING`].
    #[error("field tables nested too deeply")]
    NestingTooDeep,
    /// A content header set a property flag that the class does not define.
    #[error("unknown property flag")]
    UnknownPropertyFlag,
}

impl<I> nom::error::ParseError<I> for Malformed {
    fn from_error_kind(_input: I, _kind: nom::error::ErrorKind) -> Self {
        Malformed::Truncated
    }

    fn append(_input: I, _kind: nom::error::ErrorKind, other: Self) -> Self {
        other
    }
}

impl From<nom::Err<Malformed>> for Malformed {
    fn from(e: nom::Err<Malformed>) -> Self {
        match e {
            nom::Err::Incomplete(_) => Malformed::Truncated,
            nom::Err::Error(m) | nom::Err::Failure(m) => m,
        }
    }
}

/// Errors decoding frames from a peer or encoding frames for one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A frame declared a payload larger than the negotiated `frame_max` allows.
    #[error("frame size {size} exceeds frame_max {frame_max}")]
    FrameTooLarge {
        /// Total frame size the peer declared (header + payload + frame end).
        size: u64,
        /// The negotiated maximum.
        frame_max: u32,
    },
    /// The octet after the payload was not `0xCE`.
    #[error("frame end octet was {0:#04x}, expected 0xce")]
    BadFrameEnd(u8),
    /// The frame type octet is not method, header, body or heartbeat.
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    /// A heartbeat arrived on a channel other than 0 (505, as RabbitMQ).
    #[error("heartbeat frame on channel {0}")]
    HeartbeatOnChannel(u16),
    /// A heartbeat frame carried a payload.
    #[error("heartbeat frame with a {0}-octet payload")]
    HeartbeatWithPayload(usize),
    /// A method frame named a class/method pair the protocol does not have.
    #[error("unknown method {class_id}.{method_id}")]
    UnknownMethod {
        /// Class id as received.
        class_id: u16,
        /// Method id as received.
        method_id: u16,
    },
    /// A method payload could not be decoded.
    #[error("cannot decode {method}: {reason}")]
    MalformedMethod {
        /// `class.method`, or `method frame` when even the ids were missing.
        method: &'static str,
        /// The method's class and method ids ((0, 0) when unknown, or for a
        /// short string that is not UTF-8, as RabbitMQ reports it).
        ids: (u16, u16),
        /// What was wrong.
        reason: Malformed,
    },
    /// A content header payload could not be decoded.
    #[error("cannot decode content header: {0}")]
    MalformedContentHeader(Malformed),
    /// A frame arrived that the command assembler's state does not allow.
    #[error("{0}")]
    UnexpectedFrame(UnexpectedFrame),
    /// A content header announced a body larger than the configured maximum.
    #[error("message size {size} is larger than configured max size {max}")]
    BodyTooLarge {
        /// Body size from the content header.
        size: u64,
        /// Configured maximum.
        max: u64,
    },
    /// A value cannot be represented on the wire (a short string over 255
    /// octets, a long string or table over 4 GiB, a frame over `u32`).
    #[error("{what} is {len} octets, more than the {max} the wire format allows")]
    TooLong {
        /// What was too long.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The wire format's limit.
        max: u64,
    },
}

/// Frame-order violations found by the [`crate::CommandAssembler`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnexpectedFrame {
    /// A content header or body frame arrived when a method frame was expected.
    #[error("expected method frame, got non method frame instead")]
    ExpectedMethod,
    /// Something other than a content header followed a content-carrying method.
    #[error("expected content header for class {0}, got non content header frame instead")]
    ExpectedHeader(u16),
    /// The content header's class did not match the method's class.
    #[error("expected content header for class {expected}, got one for class {got} instead")]
    HeaderClassMismatch {
        /// The method's class.
        expected: u16,
        /// The header's class.
        got: u16,
    },
    /// Something other than a body frame arrived while body octets were outstanding.
    #[error("expected content body, got non content body frame instead")]
    ExpectedBody,
    /// Body frames carried more octets than the content header declared.
    #[error("content body frames exceed the declared body size by {0} octets")]
    BodyOverrun(u64),
}

impl CodecError {
    pub(crate) fn malformed_method(method: &'static str, e: nom::Err<Malformed>) -> Self {
        CodecError::MalformedMethod {
            method,
            ids: (0, 0),
            reason: e.into(),
        }
    }

    /// The AMQP reply code a broker closes with when it meets this error.
    pub fn reply_code(&self) -> u16 {
        match self {
            CodecError::FrameTooLarge { .. }
            | CodecError::BadFrameEnd(_)
            | CodecError::UnknownFrameType(_)
            | CodecError::HeartbeatWithPayload(_) => reply_code::FRAME_ERROR,
            // RabbitMQ closes with 501 FRAME_ERROR ("cannot decode ...") for
            // arguments that do not decode; the spec's 502 SYNTAX_ERROR is
            // not what clients see from it.
            CodecError::MalformedMethod { .. } | CodecError::MalformedContentHeader(_) => {
                reply_code::FRAME_ERROR
            }
            CodecError::UnknownMethod { .. } => reply_code::NOT_IMPLEMENTED,
            CodecError::UnexpectedFrame(_) | CodecError::HeartbeatOnChannel(_) => {
                reply_code::UNEXPECTED_FRAME
            }
            CodecError::BodyTooLarge { .. } => reply_code::PRECONDITION_FAILED,
            CodecError::TooLong { .. } => reply_code::INTERNAL_ERROR,
        }
    }

    /// Whether the error closes the whole connection (true) or only the channel.
    ///
    /// Only an over-size message body is channel-scoped, as in RabbitMQ.
    pub fn is_connection_error(&self) -> bool {
        !matches!(self, CodecError::BodyTooLarge { .. })
    }

    /// The class and method ids of the method an error is about, if any:
    /// RabbitMQ names them in its `connection.close`.
    pub fn method_ids(&self) -> Option<(u16, u16)> {
        match self {
            CodecError::MalformedMethod { ids, .. } if *ids != (0, 0) => Some(*ids),
            _ => None,
        }
    }

    pub(crate) fn too_long(what: &'static str, len: usize, max: u64) -> Self {
        CodecError::TooLong { what, len, max }
    }
}
