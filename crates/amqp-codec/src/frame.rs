//! Frames: splitting them off a read buffer, decoding their payloads, and
//! encoding them straight into a write buffer.
//!
//! Reading is "check, then parse" (as in mini-redis): [`split_frame`] looks at
//! the 7-octet header, rejects a declared size above `frame_max` before it
//! reserves or copies anything, waits until the whole frame is buffered, checks
//! the frame-end octet and only then splits the frame off as a `Bytes` (a
//! reference-counted view of the read buffer: body payloads are never copied).
//! [`Frame::decode`] then turns the payload into a typed frame.
//!
//! ```text
//! 0      1         3         7                  size+7   size+8
//! +------+---------+---------+--------------------+--------+
//! | type | channel |  size   |  payload (size)    |  0xCE  |
//! +------+---------+---------+--------------------+--------+
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};
use nom::Parser;
use nom::number::complete::be_u16;

use crate::content::ContentHeader;
use crate::error::{CodecError, Malformed};
use crate::methods::{Method, frame_constant};
use crate::primitives::{begin_length_prefix, end_length_prefix};

/// Octets of frame envelope around the payload: type, channel, size, frame-end.
pub const FRAME_OVERHEAD: u32 = 8;
const HEADER_LEN: usize = 7;
/// Most a partial frame makes [`split_frame`] reserve at once.
const RESERVE_STEP: usize = 64 * 1024;

/// The protocol header a 0-9-1 client sends first.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";

/// What the first octets of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolHeaderCheck {
    /// Fewer than 8 octets so far, all consistent with AMQP 0-9-1.
    Incomplete,
    /// `AMQP 0 0 9 1`: consume 8 octets and carry on.
    Valid,
    /// Something else. The spec says: reply with [`PROTOCOL_HEADER`] and close.
    Invalid,
}

/// Checks the protocol header at the start of `buf` without consuming it.
pub fn check_protocol_header(buf: &[u8]) -> ProtocolHeaderCheck {
    let n = buf.len().min(PROTOCOL_HEADER.len());
    if buf.get(..n) != PROTOCOL_HEADER.get(..n) {
        ProtocolHeaderCheck::Invalid
    } else if n < PROTOCOL_HEADER.len() {
        ProtocolHeaderCheck::Incomplete
    } else {
        ProtocolHeaderCheck::Valid
    }
}

/// Frame type octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameType {
    /// 1
    Method,
    /// 2
    Header,
    /// 3
    Body,
    /// 8
    Heartbeat,
}

impl FrameType {
    fn from_octet(t: u8) -> Option<FrameType> {
        match t {
            frame_constant::METHOD => Some(FrameType::Method),
            frame_constant::HEADER => Some(FrameType::Header),
            frame_constant::BODY => Some(FrameType::Body),
            frame_constant::HEARTBEAT => Some(FrameType::Heartbeat),
            _ => None,
        }
    }

    fn octet(self) -> u8 {
        match self {
            FrameType::Method => frame_constant::METHOD,
            FrameType::Header => frame_constant::HEADER,
            FrameType::Body => frame_constant::BODY,
            FrameType::Heartbeat => frame_constant::HEARTBEAT,
        }
    }
}

/// A complete frame whose payload has not been decoded yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// Frame type.
    pub frame_type: FrameType,
    /// Channel number.
    pub channel: u16,
    /// Payload: a zero-copy slice of the read buffer.
    pub payload: Bytes,
}

/// Splits one frame off the front of `buf`.
///
/// * `Ok(None)`: more data is needed (room for the whole frame has been reserved).
/// * `Ok(Some(frame))`: the frame's octets were removed from `buf`.
/// * `Err(_)`: a frame error (501); the connection must be closed.
///
/// `frame_max` is the negotiated maximum frame size including the 8 octets of
/// envelope; 0 means no limit beyond the 32-bit size field.
#[inline]
pub fn split_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<RawFrame>, CodecError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(header);
    let [frame_type, c0, c1, s0, s1, s2, s3] = h;
    let channel = u16::from_be_bytes([c0, c1]);
    let size = u32::from_be_bytes([s0, s1, s2, s3]);
    let total = u64::from(size) + u64::from(FRAME_OVERHEAD);
    if frame_max != 0 && total > u64::from(frame_max) {
        return Err(CodecError::FrameTooLarge {
            size: total,
            frame_max,
        });
    }
    let frame_type =
        FrameType::from_octet(frame_type).ok_or(CodecError::UnknownFrameType(frame_type))?;
    // `total` fits in usize: it is at most 2^32 + 7, checked against frame_max above
    // when one is set; on 32-bit targets without a limit, refuse instead of wrapping.
    let total = usize::try_from(total).map_err(|_| CodecError::FrameTooLarge {
        size: total,
        frame_max,
    })?;
    if buf.len() < total {
        // Reserve for what is missing, but at most 64 KiB at a time: a
        // frame_max of 0 must not let a peer's size field allocate 4 GiB.
        buf.reserve((total - buf.len()).min(RESERVE_STEP));
        return Ok(None);
    }
    let end = buf.get(total - 1).copied().unwrap_or_default();
    if end != frame_constant::END {
        return Err(CodecError::BadFrameEnd(end));
    }
    // `buf` holds the whole frame (checked above), so these cannot run short.
    // Advancing past header and frame end, rather than splitting the whole
    // frame and slicing it, saves a reference-count round trip per frame.
    #[allow(clippy::disallowed_methods)]
    {
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(total - HEADER_LEN - 1).freeze();
        buf.advance(1);
        Ok(Some(RawFrame {
            frame_type,
            channel,
            payload,
        }))
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A method frame.
    Method {
        /// Channel number.
        channel: u16,
        /// The method.
        method: Method,
    },
    /// A content header frame.
    Header {
        /// Channel number.
        channel: u16,
        /// The header.
        header: ContentHeader,
    },
    /// A content body frame.
    Body {
        /// Channel number.
        channel: u16,
        /// The body fragment (zero-copy).
        body: Bytes,
    },
    /// A heartbeat (always channel 0).
    Heartbeat,
}

impl Frame {
    /// Decodes a raw frame's payload.
    #[inline]
    pub fn decode(raw: RawFrame) -> Result<Frame, CodecError> {
        let RawFrame {
            frame_type,
            channel,
            payload,
        } = raw;
        Ok(match frame_type {
            FrameType::Method => Frame::Method {
                channel,
                method: decode_method(&payload)?,
            },
            FrameType::Header => Frame::Header {
                channel,
                header: ContentHeader::decode(&payload)?,
            },
            FrameType::Body => Frame::Body {
                channel,
                body: payload,
            },
            FrameType::Heartbeat if channel != 0 => {
                return Err(CodecError::HeartbeatOnChannel(channel));
            }
            FrameType::Heartbeat if !payload.is_empty() => {
                return Err(CodecError::HeartbeatWithPayload(payload.len()));
            }
            FrameType::Heartbeat => Frame::Heartbeat,
        })
    }

    /// The frame's channel (0 for heartbeats).
    pub fn channel(&self) -> u16 {
        match self {
            Frame::Method { channel, .. }
            | Frame::Header { channel, .. }
            | Frame::Body { channel, .. } => *channel,
            Frame::Heartbeat => 0,
        }
    }

    /// Encodes the frame into `buf`. A body frame is written as one frame as it is.
    pub fn encode(&self, buf: &mut BytesMut) -> Result<(), CodecError> {
        match self {
            Frame::Method { channel, method } => encode_method(buf, *channel, method),
            Frame::Header { channel, header } => {
                encode_frame(buf, FrameType::Header, *channel, |b| {
                    header.encode(b);
                    Ok(())
                })
            }
            Frame::Body { channel, body } => encode_frame(buf, FrameType::Body, *channel, |b| {
                b.put_slice(body);
                Ok(())
            }),
            Frame::Heartbeat => {
                encode_heartbeat(buf);
                Ok(())
            }
        }
    }
}

/// Splits and decodes one frame: [`split_frame`] then [`Frame::decode`].
#[inline]
pub fn decode_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, CodecError> {
    match split_frame(buf, frame_max)? {
        Some(raw) => Frame::decode(raw).map(Some),
        None => Ok(None),
    }
}

/// Decodes a method frame's payload: class id, method id, fields. The fields
/// must fill the payload exactly.
#[inline]
pub fn decode_method(payload: &Bytes) -> Result<Method, CodecError> {
    let (fields, (class_id, method_id)) = (be_u16::<&[u8], Malformed>, be_u16)
        .parse(payload.as_ref())
        .map_err(|e| CodecError::malformed_method("method frame", e))?;
    let (rest, method) =
        Method::decode_fields(class_id, method_id, payload, fields).map_err(|e| match e {
            CodecError::MalformedMethod { method, reason, .. }
                if reason != Malformed::InvalidUtf8 =>
            {
                CodecError::MalformedMethod {
                    method,
                    ids: (class_id, method_id),
                    reason,
                }
            }
            other => other,
        })?;
    if !rest.is_empty() {
        return Err(CodecError::MalformedMethod {
            method: method.name(),
            ids: (class_id, method_id),
            reason: Malformed::TrailingBytes(rest.len()),
        });
    }
    Ok(method)
}

/// Writes one frame whose payload `write` produces, patching in the size.
fn encode_frame(
    buf: &mut BytesMut,
    frame_type: FrameType,
    channel: u16,
    write: impl FnOnce(&mut BytesMut) -> Result<(), CodecError>,
) -> Result<(), CodecError> {
    let start = buf.len();
    buf.put_u8(frame_type.octet());
    buf.put_u16(channel);
    let size = begin_length_prefix(buf);
    let written = write(buf).and_then(|()| end_length_prefix(buf, size, "frame payload"));
    if written.is_err() {
        // Leave the buffer as it was: no half-written frame goes out.
        buf.truncate(start);
        return written;
    }
    buf.put_u8(frame_constant::END);
    Ok(())
}

/// Writes a method frame.
pub fn encode_method(buf: &mut BytesMut, channel: u16, method: &Method) -> Result<(), CodecError> {
    encode_frame(buf, FrameType::Method, channel, |b| {
        b.put_u16(method.class_id());
        b.put_u16(method.method_id());
        method.encode_fields(b)
    })
}

/// Writes a content header frame.
pub fn encode_content_header(
    buf: &mut BytesMut,
    channel: u16,
    header: &ContentHeader,
) -> Result<(), CodecError> {
    encode_frame(buf, FrameType::Header, channel, |b| {
        header.encode(b);
        Ok(())
    })
}

/// Writes `body` as as many body frames as `frame_max` requires (none for an
/// empty body). `frame_max` 0 means unlimited.
pub fn encode_body(
    buf: &mut BytesMut,
    channel: u16,
    body: &[u8],
    frame_max: u32,
) -> Result<(), CodecError> {
    let chunk = match frame_max {
        0 => u32::MAX - FRAME_OVERHEAD,
        n => n.saturating_sub(FRAME_OVERHEAD).max(1),
    };
    let chunk = usize::try_from(chunk).unwrap_or(usize::MAX);
    buf.reserve(body.len() + (body.len() / chunk + 1) * FRAME_OVERHEAD as usize);
    for part in body.chunks(chunk) {
        encode_frame(buf, FrameType::Body, channel, |b| {
            b.put_slice(part);
            Ok(())
        })?;
    }
    Ok(())
}

/// Writes a heartbeat frame.
pub fn encode_heartbeat(buf: &mut BytesMut) {
    buf.put_slice(&[
        frame_constant::HEARTBEAT,
        0,
        0,
        0,
        0,
        0,
        0,
        frame_constant::END,
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::{BasicQos, ChannelOpen};

    #[test]
    fn protocol_header_check() {
        assert_eq!(
            check_protocol_header(b"AMQ"),
            ProtocolHeaderCheck::Incomplete
        );
        assert_eq!(
            check_protocol_header(b"AMQP\0\0\x09\x01"),
            ProtocolHeaderCheck::Valid
        );
        assert_eq!(
            check_protocol_header(b"AMQP\0\0\x09\x02"),
            ProtocolHeaderCheck::Invalid
        );
        assert_eq!(
            check_protocol_header(b"GET / HTTP/1.1"),
            ProtocolHeaderCheck::Invalid
        );
        assert_eq!(check_protocol_header(b"G"), ProtocolHeaderCheck::Invalid);
    }

    #[test]
    fn oversized_frame_is_rejected_from_its_header_alone() {
        // Only the 7-octet header has arrived; it claims 200000 octets.
        let mut buf = BytesMut::from(&[1u8, 0, 1, 0, 3, 0x0d, 0x40][..]);
        let cap = buf.capacity();
        assert_eq!(
            split_frame(&mut buf, 131_072),
            Err(CodecError::FrameTooLarge {
                size: 200_008,
                frame_max: 131_072
            })
        );
        assert_eq!(buf.capacity(), cap, "nothing reserved for a rejected frame");
    }

    #[test]
    fn frame_max_counts_the_envelope() {
        let mut buf = BytesMut::new();
        encode_body(&mut buf, 1, &[7u8; 4088], 0).unwrap();
        assert_eq!(buf.len(), 4096);
        assert!(split_frame(&mut buf.clone(), 4096).unwrap().is_some());
        assert!(split_frame(&mut buf, 4095).is_err());
    }

    #[test]
    fn partial_frames_wait_and_bad_frame_end_is_an_error() {
        let mut full = BytesMut::new();
        encode_method(
            &mut full,
            3,
            &Method::from(BasicQos {
                prefetch_count: 10,
                ..Default::default()
            }),
        )
        .unwrap();
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(split_frame(&mut part, 0), Ok(None), "cut at {cut}");
        }
        let mut bad = full.clone();
        let last = bad.len() - 1;
        bad[last] = 0xcd;
        assert_eq!(split_frame(&mut bad, 0), Err(CodecError::BadFrameEnd(0xcd)));
        let frame = decode_frame(&mut full, 0).unwrap().unwrap();
        assert_eq!(frame.channel(), 3);
        assert!(full.is_empty());
    }

    #[test]
    fn unknown_frame_type_and_channel_heartbeat() {
        let mut buf = BytesMut::from(&[9u8, 0, 0, 0, 0, 0, 0, 0xce][..]);
        assert_eq!(
            split_frame(&mut buf, 0),
            Err(CodecError::UnknownFrameType(9))
        );
        let mut hb = BytesMut::from(&[8u8, 0, 1, 0, 0, 0, 0, 0xce][..]);
        assert_eq!(
            decode_frame(&mut hb, 0),
            Err(CodecError::HeartbeatOnChannel(1))
        );
        let mut ok = BytesMut::new();
        encode_heartbeat(&mut ok);
        assert_eq!(decode_frame(&mut ok, 0), Ok(Some(Frame::Heartbeat)));
    }

    #[test]
    fn trailing_octets_after_method_fields_are_a_frame_error_naming_the_method() {
        let mut buf = BytesMut::new();
        encode_method(&mut buf, 1, &Method::from(ChannelOpen::default())).unwrap();
        let payload = buf.freeze().slice(7..12);
        let mut longer = BytesMut::from(&payload[..]);
        longer.extend_from_slice(b"xx");
        let err = decode_method(&longer.freeze()).unwrap_err();
        assert_eq!(err.reply_code(), 501);
        assert_eq!(err.method_ids(), Some((20, 10)));
        assert!(matches!(
            err,
            CodecError::MalformedMethod {
                method: "channel.open",
                reason: Malformed::TrailingBytes(2),
                ..
            }
        ));
    }

    #[test]
    fn unknown_method_ids() {
        let err = decode_method(&Bytes::from_static(&[0, 99, 0, 10])).unwrap_err();
        assert_eq!(
            err,
            CodecError::UnknownMethod {
                class_id: 99,
                method_id: 10
            }
        );
        let err = decode_method(&Bytes::from_static(&[0, 60])).unwrap_err();
        assert_eq!(err.reply_code(), 501);
        assert_eq!(err.method_ids(), None);
    }

    #[test]
    fn body_is_split_at_frame_max() {
        let body = vec![1u8; 10_000];
        let mut buf = BytesMut::new();
        encode_body(&mut buf, 2, &body, 4096).unwrap();
        let mut got = Vec::new();
        while let Some(Frame::Body { channel: 2, body }) = decode_frame(&mut buf, 4096).unwrap() {
            assert!(body.len() <= 4088);
            got.extend_from_slice(&body);
        }
        assert_eq!(got, body);
    }
}
