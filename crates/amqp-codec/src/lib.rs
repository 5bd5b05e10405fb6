//! # amqp-codec
//!
//! The AMQP 0-9-1 wire format as RabbitMQ 3.x speaks it, including RabbitMQ's
//! extensions (publisher confirms, `basic.nack`, `exchange.bind`,
//! `connection.blocked`, `connection.update-secret`, its field-table types).
//! Pure data transformation: no I/O, no async runtime.
//!
//! ## Layout
//! - [`frame`]: protocol header check, splitting frames off a read buffer
//!   ([`split_frame`], [`decode_frame`]), encoding frames into a write buffer.
//! - [`methods`] (generated from the spec by `codegen/generate.py`): one struct per
//!   method, the [`Method`] enum, class ids, frame constants and reply codes.
//! - [`content`] / [`properties`]: content headers, with basic properties kept
//!   encoded ([`RawProperties`]) until someone needs them ([`BasicProperties`]).
//! - [`table`]: field tables and arrays ([`FieldTable`], [`FieldValue`]).
//! - [`assembler`]: frames of one channel → complete [`Command`]s.
//! - [`error`]: [`CodecError`], which knows the reply code to close with.
//! - [`fuzzing`]: entry points for the fuzz targets and no-panic tests.
//!
//! ## Reading
//! ```
//! use amqp_codec::{decode_frame, CommandAssembler, Frame};
//! # use bytes::BytesMut;
//! # let mut read_buf = BytesMut::new();
//! let mut assembler = CommandAssembler::new(128 << 20);
//! while let Some(frame) = decode_frame(&mut read_buf, 131_072)? {
//!     if let Frame::Heartbeat = frame { continue }
//!     if let Some(command) = assembler.push(frame)? {
//!         println!("{}", command.method.name());
//!     }
//! }
//! # Ok::<(), amqp_codec::CodecError>(())
//! ```
//!
//! Bodies and short strings are zero-copy slices of the read buffer. Nothing a
//! peer sends can make the decoder panic or allocate more than the peer has
//! actually sent (frames are checked against `frame_max` from their header,
//! before anything is reserved).

pub mod assembler;
pub mod content;
pub mod error;
pub mod frame;
pub mod fuzzing;
pub mod methods;
mod primitives;
pub mod properties;
pub mod table;
pub mod types;

pub use assembler::{Command, CommandAssembler, Content};
pub use content::ContentHeader;
pub use error::{CodecError, Malformed, UnexpectedFrame};
pub use frame::{
    FRAME_OVERHEAD, Frame, FrameType, PROTOCOL_HEADER, ProtocolHeaderCheck, RawFrame,
    check_protocol_header, decode_frame, decode_method, encode_body, encode_content_header,
    encode_heartbeat, encode_method, split_frame,
};
pub use methods::{Method, class_id, frame_constant, method_name, reply_code};
pub use properties::{BasicProperties, Property, RawProperties};
pub use table::{FieldTable, FieldValue};
pub use types::ShortStr;
