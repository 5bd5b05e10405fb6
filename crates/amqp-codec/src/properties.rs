//! Message properties of the `basic` class: [`RawProperties`] as they travel,
//! [`BasicProperties`] when someone needs them decoded.
//!
//! A broker forwards most messages without looking at their properties, so the
//! content header keeps them as the peer's encoded octets (a zero-copy `Bytes`)
//! plus the flags word. The few properties the broker itself reads on the hot
//! path (delivery mode, priority, expiration, user id) have accessors that walk
//! the raw octets without allocating; everything else is decoded on demand by
//! [`RawProperties::decode`]. The structure is validated once, when the header
//! frame is decoded, so the accessors cannot meet truncated data later.

use bytes::{BufMut, Bytes, BytesMut};
use nom::Parser;
use nom::bytes::complete::take;
use nom::number::complete::{be_u8, be_u32, be_u64};

use crate::error::{CodecError, Malformed};
use crate::primitives::{PResult, put_short_str, short_str};
use crate::table::{FieldTable, field_table};
use crate::types::ShortStr;

/// Wire shape of each of the 14 basic properties, in flag order (bit 15 first).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    ShortStr,
    Table,
    Octet,
    Timestamp,
}

const SHAPES: [Shape; 14] = [
    Shape::ShortStr,  // content-type
    Shape::ShortStr,  // content-encoding
    Shape::Table,     // headers
    Shape::Octet,     // delivery-mode
    Shape::Octet,     // priority
    Shape::ShortStr,  // correlation-id
    Shape::ShortStr,  // reply-to
    Shape::ShortStr,  // expiration
    Shape::ShortStr,  // message-id
    Shape::Timestamp, // timestamp
    Shape::ShortStr,  // type
    Shape::ShortStr,  // user-id
    Shape::ShortStr,  // app-id
    Shape::ShortStr,  // cluster-id
];

/// Index of each property in flag order; its flag bit is `1 << (15 - index)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Property {
    ContentType = 0,
    ContentEncoding,
    Headers,
    DeliveryMode,
    Priority,
    CorrelationId,
    ReplyTo,
    Expiration,
    MessageId,
    Timestamp,
    Type,
    UserId,
    AppId,
    ClusterId,
}

impl Property {
    /// The property's bit in the flags word.
    pub const fn flag(self) -> u16 {
        1 << (15 - self as u16)
    }
}

/// Flag bits that name no property of the basic class (bit 0 is the continuation bit).
const UNDEFINED_FLAGS: u16 = 0b10;
const CONTINUATION: u16 = 1;

/// Encoded basic properties: the flags word and the property list octets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawProperties {
    flags: u16,
    list: Bytes,
}

impl RawProperties {
    /// Parses the flags word(s) and validates the property list that follows,
    /// which must fill `i` exactly. Returns the properties as slices of `src`.
    #[inline]
    pub(crate) fn parse(src: &Bytes, i: &[u8]) -> Result<RawProperties, Malformed> {
        let (mut i, flags) = nom::number::complete::be_u16::<_, Malformed>(i)?;
        // Continuation words: basic has only 14 properties, so any further word
        // must name none.
        let mut word = flags;
        while word & CONTINUATION != 0 {
            let (rest, next) = nom::number::complete::be_u16::<_, Malformed>(i)?;
            if next & !CONTINUATION != 0 {
                return Err(Malformed::UnknownPropertyFlag);
            }
            word = next;
            i = rest;
        }
        if flags & UNDEFINED_FLAGS != 0 {
            return Err(Malformed::UnknownPropertyFlag);
        }
        let flags = flags & !CONTINUATION;
        let mut rest = i;
        for (index, shape) in SHAPES.iter().enumerate() {
            if flags & (1 << (15 - index)) != 0 {
                rest = skip(rest, *shape)?.0;
            }
        }
        if !rest.is_empty() {
            return Err(Malformed::TrailingBytes(rest.len()));
        }
        Ok(RawProperties {
            flags,
            list: src.slice_ref(i),
        })
    }

    /// The flags word (without continuation bit).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// The encoded property list (without the flags word).
    pub fn list(&self) -> &Bytes {
        &self.list
    }

    /// Whether `p` is present.
    pub fn has(&self, p: Property) -> bool {
        self.flags & p.flag() != 0
    }

    /// The encoded octets of property `p` (for strings and tables, including
    /// their length prefix), or `None` if absent. Never allocates.
    fn raw(&self, p: Property) -> Option<&[u8]> {
        if !self.has(p) {
            return None;
        }
        let mut i: &[u8] = &self.list;
        for (index, shape) in SHAPES.iter().enumerate() {
            if self.flags & (1 << (15 - index)) == 0 {
                continue;
            }
            // The list was validated when parsed, so skipping cannot fail.
            let (rest, value) = skip(i, *shape).ok()?;
            if index == p as usize {
                return Some(value);
            }
            i = rest;
        }
        None
    }

    /// `delivery-mode`: 2 = persistent.
    pub fn delivery_mode(&self) -> Option<u8> {
        self.raw(Property::DeliveryMode)?.first().copied()
    }

    /// `priority`.
    pub fn priority(&self) -> Option<u8> {
        self.raw(Property::Priority)?.first().copied()
    }

    fn short_str(&self, p: Property) -> Option<ShortStr> {
        let raw = self.raw(p)?;
        let (_, s) = short_str(&self.list, raw).ok()?;
        Some(s)
    }

    /// `expiration` (a per-message TTL in milliseconds, as a decimal string).
    pub fn expiration(&self) -> Option<ShortStr> {
        self.short_str(Property::Expiration)
    }

    /// `user-id`.
    pub fn user_id(&self) -> Option<ShortStr> {
        self.short_str(Property::UserId)
    }

    /// `reply-to`.
    pub fn reply_to(&self) -> Option<ShortStr> {
        self.short_str(Property::ReplyTo)
    }

    /// `headers`, decoded.
    pub fn headers(&self) -> Result<Option<FieldTable>, Malformed> {
        match self.raw(Property::Headers) {
            None => Ok(None),
            Some(raw) => Ok(Some(field_table(&self.list, raw, 0)?.1)),
        }
    }

    /// Decodes every property.
    pub fn decode(&self) -> Result<BasicProperties, Malformed> {
        let mut props = BasicProperties::default();
        let src = &self.list;
        let mut i: &[u8] = src;
        macro_rules! field {
            ($p:expr, $parse:expr, $slot:expr) => {
                if self.has($p) {
                    let (rest, v) = $parse(i)?;
                    $slot = Some(v);
                    i = rest;
                }
            };
        }
        let s = |i| short_str(src, i);
        field!(Property::ContentType, s, props.content_type);
        field!(Property::ContentEncoding, s, props.content_encoding);
        field!(Property::Headers, |i| field_table(src, i, 0), props.headers);
        field!(Property::DeliveryMode, be_u8, props.delivery_mode);
        field!(Property::Priority, be_u8, props.priority);
        field!(Property::CorrelationId, s, props.correlation_id);
        field!(Property::ReplyTo, s, props.reply_to);
        field!(Property::Expiration, s, props.expiration);
        field!(Property::MessageId, s, props.message_id);
        field!(Property::Timestamp, be_u64, props.timestamp);
        field!(Property::Type, s, props.kind);
        field!(Property::UserId, s, props.user_id);
        field!(Property::AppId, s, props.app_id);
        field!(Property::ClusterId, s, props.cluster_id);
        if !i.is_empty() {
            return Err(Malformed::TrailingBytes(i.len()));
        }
        Ok(props)
    }

    /// Writes the flags word and the property list.
    pub(crate) fn encode(&self, buf: &mut BytesMut) {
        buf.put_u16(self.flags);
        buf.put_slice(&self.list);
    }
}

/// Skips one encoded value of `shape`; returns the rest and the value's octets.
fn skip(i: &[u8], shape: Shape) -> PResult<'_, &[u8]> {
    let len = match shape {
        Shape::Octet => 1,
        Shape::Timestamp => 8,
        Shape::ShortStr => 1 + usize::from(be_u8(i)?.1),
        Shape::Table => {
            let n = be_u32(i)?.1;
            4usize.saturating_add(usize::try_from(n).unwrap_or(usize::MAX))
        }
    };
    let (rest, value) = take(len).parse(i)?;
    Ok((rest, value))
}

/// The 14 properties of the `basic` class, decoded.
#[derive(Debug, Clone, Default, PartialEq)]
#[allow(missing_docs)]
pub struct BasicProperties {
    pub content_type: Option<ShortStr>,
    pub content_encoding: Option<ShortStr>,
    pub headers: Option<FieldTable>,
    /// 1 = transient, 2 = persistent.
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub correlation_id: Option<ShortStr>,
    pub reply_to: Option<ShortStr>,
    /// Per-message TTL in milliseconds, as a decimal string.
    pub expiration: Option<ShortStr>,
    pub message_id: Option<ShortStr>,
    pub timestamp: Option<u64>,
    /// The `type` property.
    pub kind: Option<ShortStr>,
    pub user_id: Option<ShortStr>,
    pub app_id: Option<ShortStr>,
    pub cluster_id: Option<ShortStr>,
}

impl BasicProperties {
    /// Encodes into the form carried by content headers.
    pub fn to_raw(&self) -> Result<RawProperties, CodecError> {
        let mut flags = 0u16;
        let mut buf = BytesMut::new();
        let b = &mut buf;
        put_str(&mut flags, b, Property::ContentType, &self.content_type);
        put_str(
            &mut flags,
            b,
            Property::ContentEncoding,
            &self.content_encoding,
        );
        if let Some(h) = &self.headers {
            flags |= Property::Headers.flag();
            h.encode(b)?;
        }
        put_octet(&mut flags, b, Property::DeliveryMode, self.delivery_mode);
        put_octet(&mut flags, b, Property::Priority, self.priority);
        put_str(&mut flags, b, Property::CorrelationId, &self.correlation_id);
        put_str(&mut flags, b, Property::ReplyTo, &self.reply_to);
        put_str(&mut flags, b, Property::Expiration, &self.expiration);
        put_str(&mut flags, b, Property::MessageId, &self.message_id);
        if let Some(v) = self.timestamp {
            flags |= Property::Timestamp.flag();
            b.put_u64(v);
        }
        put_str(&mut flags, b, Property::Type, &self.kind);
        put_str(&mut flags, b, Property::UserId, &self.user_id);
        put_str(&mut flags, b, Property::AppId, &self.app_id);
        put_str(&mut flags, b, Property::ClusterId, &self.cluster_id);
        Ok(RawProperties {
            flags,
            list: buf.freeze(),
        })
    }
}

fn put_str(flags: &mut u16, buf: &mut BytesMut, p: Property, v: &Option<ShortStr>) {
    if let Some(v) = v {
        *flags |= p.flag();
        put_short_str(buf, v);
    }
}

fn put_octet(flags: &mut u16, buf: &mut BytesMut, p: Property, v: Option<u8>) {
    if let Some(v) = v {
        *flags |= p.flag();
        buf.put_u8(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::FieldValue;

    fn full() -> BasicProperties {
        let mut headers = FieldTable::new();
        headers.insert(ShortStr::from_static("x-a"), FieldValue::I32(7));
        BasicProperties {
            content_type: Some(ShortStr::from_static("text/plain")),
            content_encoding: Some(ShortStr::from_static("gzip")),
            headers: Some(headers),
            delivery_mode: Some(2),
            priority: Some(5),
            correlation_id: Some(ShortStr::from_static("c1")),
            reply_to: Some(ShortStr::from_static("amq.rabbitmq.reply-to")),
            expiration: Some(ShortStr::from_static("60000")),
            message_id: Some(ShortStr::from_static("m1")),
            timestamp: Some(1_700_000_000),
            kind: Some(ShortStr::from_static("t")),
            user_id: Some(ShortStr::from_static("guest")),
            app_id: Some(ShortStr::from_static("app")),
            cluster_id: Some(ShortStr::from_static("c")),
        }
    }

    fn reparse(raw: &RawProperties) -> RawProperties {
        let mut buf = BytesMut::new();
        raw.encode(&mut buf);
        let bytes = buf.freeze();
        RawProperties::parse(&bytes, &bytes).unwrap()
    }

    #[test]
    fn all_fourteen_round_trip() {
        let props = full();
        let raw = reparse(&props.to_raw().unwrap());
        assert_eq!(raw.flags(), 0xfffc);
        assert_eq!(raw.decode().unwrap(), props);
        assert_eq!(raw.delivery_mode(), Some(2));
        assert_eq!(raw.priority(), Some(5));
        assert_eq!(raw.expiration().unwrap(), "60000");
        assert_eq!(raw.user_id().unwrap(), "guest");
        assert_eq!(raw.reply_to().unwrap(), "amq.rabbitmq.reply-to");
        assert_eq!(raw.headers().unwrap(), props.headers);
    }

    #[test]
    fn accessors_find_properties_behind_absent_ones() {
        let props = BasicProperties {
            priority: Some(9),
            expiration: Some(ShortStr::from_static("5")),
            ..Default::default()
        };
        let raw = reparse(&props.to_raw().unwrap());
        assert_eq!(raw.delivery_mode(), None);
        assert_eq!(raw.priority(), Some(9));
        assert_eq!(raw.expiration().unwrap(), "5");
        assert_eq!(raw.user_id(), None);
    }

    #[test]
    fn undefined_flag_and_truncation_are_rejected() {
        let bad_flag = Bytes::from_static(&[0x00, 0x02]);
        assert_eq!(
            RawProperties::parse(&bad_flag, &bad_flag),
            Err(Malformed::UnknownPropertyFlag)
        );
        // content-type present, claims 5 octets, has 2.
        let short = Bytes::from_static(&[0x80, 0x00, 5, b'a', b'b']);
        assert_eq!(
            RawProperties::parse(&short, &short),
            Err(Malformed::Truncated)
        );
        // delivery-mode present plus one stray octet.
        let trailing = Bytes::from_static(&[0x10, 0x00, 2, 9]);
        assert_eq!(
            RawProperties::parse(&trailing, &trailing),
            Err(Malformed::TrailingBytes(1))
        );
    }

    #[test]
    fn empty_continuation_words_are_accepted() {
        let src = Bytes::from_static(&[0x10, 0x01, 0x00, 0x00, 2]);
        let raw = RawProperties::parse(&src, &src).unwrap();
        assert_eq!(raw.delivery_mode(), Some(2));
    }
}
