//! The command assembler: turns one channel's frames into complete commands.
//!
//! A command is a method, plus for content-carrying methods (`basic.publish`,
//! `basic.deliver`, `basic.return`, `basic.get-ok`) a content header and as many
//! body frames as the header's body size requires. Each channel owns one
//! assembler; it is pure state, no I/O:
//!
//! ```text
//!            method (no content)  ──────────────────────────────▶ Command
//!  Idle ──▶  method (content)  ──▶ AwaitingHeader ──▶ header(size 0) ──▶ Command
//!                                                └──▶ header(size n) ──▶ AwaitingBody
//!  AwaitingBody ──▶ body … body (Σ = n) ──▶ Command
//! ```
//!
//! Any other order is 505 UNEXPECTED_FRAME. A header announcing a body above
//! the configured maximum is refused (406) before a single body octet is
//! buffered, and body memory grows only with octets actually received: the
//! declared size is never allocated up front.

use bytes::{Bytes, BytesMut};

use crate::content::ContentHeader;
use crate::error::{CodecError, UnexpectedFrame};
use crate::frame::Frame;
use crate::methods::Method;

/// A complete command: a method and, if it carries one, its content.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The method.
    pub method: Method,
    /// Header and body, for content-carrying methods.
    pub content: Option<Content>,
}

/// Message content: header and the whole body.
#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    /// The content header (properties still encoded).
    pub header: ContentHeader,
    /// The body. A body that arrived in one frame is a zero-copy slice of it.
    pub body: Bytes,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Idle,
    AwaitingHeader(Method),
    AwaitingBody {
        method: Method,
        header: ContentHeader,
        remaining: u64,
        body: Body,
    },
}

/// Body fragments received so far: one frame is kept as it is (no copy);
/// several are kept as they came (slices of the read buffer, no copy) and
/// joined once, into one allocation of the exact size, when the last one
/// arrives. (Growing one buffer as fragments arrive doubled its capacity
/// and copied it over and over: up to three times the body at once.)
#[derive(Debug, Default)]
enum Body {
    #[default]
    Empty,
    One(Bytes),
    Many(Vec<Bytes>),
}

impl Body {
    #[inline]
    fn push(&mut self, fragment: Bytes) {
        *self = match std::mem::take(self) {
            Body::Empty => Body::One(fragment),
            Body::One(first) => Body::Many(vec![first, fragment]),
            Body::Many(mut parts) => {
                parts.push(fragment);
                Body::Many(parts)
            }
        };
    }

    #[inline]
    fn into_bytes(self) -> Bytes {
        match self {
            Body::Empty => Bytes::new(),
            Body::One(b) => b,
            Body::Many(parts) => {
                let mut joined = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
                for p in parts {
                    joined.extend_from_slice(&p);
                }
                joined.freeze()
            }
        }
    }
}

/// Assembles one channel's frames into [`Command`]s.
#[derive(Debug)]
pub struct CommandAssembler {
    state: State,
    max_body_size: u64,
}

impl CommandAssembler {
    /// An assembler that refuses bodies larger than `max_body_size` octets.
    pub fn new(max_body_size: u64) -> Self {
        CommandAssembler {
            state: State::Idle,
            max_body_size,
        }
    }

    /// Whether the assembler is between commands.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    /// Body octets received so far for the command being assembled (0
    /// between commands): what a half-received message holds in memory.
    pub fn buffered(&self) -> u64 {
        match &self.state {
            State::AwaitingBody {
                header, remaining, ..
            } => header.body_size - remaining,
            _ => 0,
        }
    }

    /// Class and method ids of the content method whose header or body is
    /// awaited, if any: a frame out of order names it in the 505 (as
    /// RabbitMQ does).
    pub fn pending_method_ids(&self) -> Option<(u16, u16)> {
        match &self.state {
            State::Idle => None,
            State::AwaitingHeader(method) | State::AwaitingBody { method, .. } => {
                Some((method.class_id(), method.method_id()))
            }
        }
    }

    /// Drops any partly assembled command (e.g. when the channel closes).
    pub fn reset(&mut self) {
        self.state = State::Idle;
    }

    /// Feeds one method, header or body frame of this channel.
    ///
    /// Returns the command when this frame completed one. On error the
    /// assembler is reset; the caller closes the channel or connection as the
    /// error's [`CodecError::is_connection_error`] says. Heartbeats are
    /// accepted in any state and ignored.
    #[inline]
    pub fn push(&mut self, frame: Frame) -> Result<Option<Command>, CodecError> {
        let result = self.step(frame);
        if result.is_err() {
            self.state = State::Idle;
        }
        result
    }

    // Matches on the state by reference and moves it only on a transition:
    // states are a few hundred octets, and this runs for every frame.
    #[inline]
    fn step(&mut self, frame: Frame) -> Result<Option<Command>, CodecError> {
        match frame {
            Frame::Method { method, .. } => {
                self.expect_idle()?;
                if method.has_content() {
                    self.state = State::AwaitingHeader(method);
                    return Ok(None);
                }
                Ok(Some(Command {
                    method,
                    content: None,
                }))
            }
            Frame::Header { header, .. } => {
                let State::AwaitingHeader(method) = &self.state else {
                    return Err(self.unexpected_here());
                };
                let expected = method.class_id();
                if header.class_id != expected {
                    return Err(unexpected(UnexpectedFrame::HeaderClassMismatch {
                        expected,
                        got: header.class_id,
                    }));
                }
                if header.body_size > self.max_body_size {
                    return Err(CodecError::BodyTooLarge {
                        size: header.body_size,
                        max: self.max_body_size,
                    });
                }
                let State::AwaitingHeader(method) = std::mem::take(&mut self.state) else {
                    return Err(unexpected(UnexpectedFrame::ExpectedMethod));
                };
                if header.body_size == 0 {
                    return Ok(Some(Command {
                        method,
                        content: Some(Content {
                            header,
                            body: Bytes::new(),
                        }),
                    }));
                }
                self.state = State::AwaitingBody {
                    method,
                    remaining: header.body_size,
                    header,
                    body: Body::Empty,
                };
                Ok(None)
            }
            Frame::Body { body: fragment, .. } => {
                let State::AwaitingBody {
                    remaining, body, ..
                } = &mut self.state
                else {
                    return Err(self.unexpected_here());
                };
                let len = fragment.len() as u64;
                if len > *remaining {
                    return Err(unexpected(UnexpectedFrame::BodyOverrun(len - *remaining)));
                }
                body.push(fragment);
                *remaining -= len;
                if *remaining > 0 {
                    return Ok(None);
                }
                match std::mem::take(&mut self.state) {
                    State::AwaitingBody {
                        method,
                        header,
                        body,
                        ..
                    } => Ok(Some(Command {
                        method,
                        content: Some(Content {
                            header,
                            body: body.into_bytes(),
                        }),
                    })),
                    _ => Err(unexpected(UnexpectedFrame::ExpectedBody)),
                }
            }
            // Heartbeats may arrive between any two frames; they are the
            // connection's business, not part of a command.
            Frame::Heartbeat => Ok(None),
        }
    }

    fn expect_idle(&self) -> Result<(), CodecError> {
        match self.state {
            State::Idle => Ok(()),
            _ => Err(self.unexpected_here()),
        }
    }

    /// The error for a frame the current state does not accept.
    fn unexpected_here(&self) -> CodecError {
        unexpected(match &self.state {
            State::Idle => UnexpectedFrame::ExpectedMethod,
            State::AwaitingHeader(method) => UnexpectedFrame::ExpectedHeader(method.class_id()),
            State::AwaitingBody { .. } => UnexpectedFrame::ExpectedBody,
        })
    }
}

fn unexpected(e: UnexpectedFrame) -> CodecError {
    CodecError::UnexpectedFrame(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::{BasicPublish, ChannelFlow, class_id};
    use crate::properties::BasicProperties;

    fn publish() -> Frame {
        Frame::Method {
            channel: 1,
            method: BasicPublish::default().into(),
        }
    }

    fn header(class_id: u16, body_size: u64) -> Frame {
        Frame::Header {
            channel: 1,
            header: ContentHeader {
                class_id,
                weight: 0,
                body_size,
                properties: BasicProperties::default().to_raw().unwrap(),
            },
        }
    }

    fn body(b: &'static [u8]) -> Frame {
        Frame::Body {
            channel: 1,
            body: Bytes::from_static(b),
        }
    }

    #[test]
    fn method_without_content_completes_at_once() {
        let mut a = CommandAssembler::new(1 << 20);
        let cmd = a
            .push(Frame::Method {
                channel: 1,
                method: ChannelFlow { active: true }.into(),
            })
            .unwrap()
            .unwrap();
        assert!(cmd.content.is_none());
        assert!(a.is_idle());
    }

    #[test]
    fn publish_header_bodies() {
        let mut a = CommandAssembler::new(1 << 20);
        assert_eq!(a.push(publish()).unwrap(), None);
        assert_eq!(a.push(header(class_id::BASIC, 5)).unwrap(), None);
        assert_eq!(a.push(body(b"he")).unwrap(), None);
        assert_eq!(a.buffered(), 2);
        let cmd = a.push(body(b"llo")).unwrap().unwrap();
        assert_eq!(a.buffered(), 0);
        assert_eq!(cmd.content.unwrap().body, Bytes::from_static(b"hello"));
    }

    #[test]
    fn single_body_frame_is_not_copied() {
        let mut a = CommandAssembler::new(1 << 20);
        a.push(publish()).unwrap();
        a.push(header(class_id::BASIC, 3)).unwrap();
        let frame_body = Bytes::from_static(b"abc");
        let ptr = frame_body.as_ptr();
        let cmd = a
            .push(Frame::Body {
                channel: 1,
                body: frame_body,
            })
            .unwrap()
            .unwrap();
        assert_eq!(cmd.content.unwrap().body.as_ptr(), ptr);
    }

    #[test]
    fn empty_body_completes_with_the_header() {
        let mut a = CommandAssembler::new(1 << 20);
        a.push(publish()).unwrap();
        let cmd = a.push(header(class_id::BASIC, 0)).unwrap().unwrap();
        assert!(cmd.content.unwrap().body.is_empty());
    }

    #[test]
    fn out_of_order_frames_are_505() {
        let mut a = CommandAssembler::new(1 << 20);
        let e = a.push(body(b"x")).unwrap_err();
        assert_eq!(e.reply_code(), 505);
        assert_eq!(
            e.to_string(),
            "expected method frame, got non method frame instead"
        );

        a.push(publish()).unwrap();
        let e = a.push(body(b"x")).unwrap_err();
        assert_eq!(
            e,
            unexpected(UnexpectedFrame::ExpectedHeader(class_id::BASIC))
        );
        assert!(a.is_idle(), "reset after an error");

        a.push(publish()).unwrap();
        let e = a.push(header(class_id::QUEUE, 1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "expected content header for class 60, got one for class 50 instead"
        );

        a.push(publish()).unwrap();
        a.push(header(class_id::BASIC, 4)).unwrap();
        assert_eq!(
            a.push(publish()).unwrap_err(),
            unexpected(UnexpectedFrame::ExpectedBody)
        );

        a.push(publish()).unwrap();
        a.push(header(class_id::BASIC, 2)).unwrap();
        assert_eq!(
            a.push(body(b"xyz")).unwrap_err(),
            unexpected(UnexpectedFrame::BodyOverrun(1))
        );
    }

    #[test]
    fn oversized_body_is_refused_at_the_header() {
        let mut a = CommandAssembler::new(100);
        a.push(publish()).unwrap();
        let e = a.push(header(class_id::BASIC, u64::MAX)).unwrap_err();
        assert_eq!(e.reply_code(), 406);
        assert!(!e.is_connection_error());
    }
}
