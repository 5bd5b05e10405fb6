//! [`Message`]: one published message as queues hold it, shared between the
//! queues it was routed to (`Arc`, body as `Bytes`: never copied per queue), and
//! its storage encoding.
//!
//! On disk a message is stored once, under its [`MessageId`], as
//! `exchange (shortstr) ‖ routing key (shortstr) ‖ header length (u32) ‖
//! content header payload ‖ body`. The content header is kept exactly as the
//! publisher's frame carried it, so recovery decodes it with the codec's own
//! validating decoder.

use std::sync::Arc;

use amqp_codec::{ContentHeader, ShortStr, class_id};
use bytes::{BufMut, Bytes, BytesMut};

use crate::error::StoreError;

/// Identity of a stored message, unique across restarts and across nodes:
/// the store's node tag in the top 16 bits (see [`crate::Store::node_tag`])
/// and a counter of that store below.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub u64);

impl MessageId {
    /// Bits of the counter below the node tag.
    pub const COUNTER_BITS: u32 = 48;

    /// The id of a store's `counter`th message.
    pub fn new(node_tag: u16, counter: u64) -> MessageId {
        MessageId(u64::from(node_tag) << Self::COUNTER_BITS | counter & Self::counter_mask())
    }

    /// The tag of the node whose store allocated it (0: a store from before
    /// tags).
    pub fn node_tag(self) -> u16 {
        (self.0 >> Self::COUNTER_BITS) as u16
    }

    /// Its place in that store's sequence.
    pub fn counter(self) -> u64 {
        self.0 & Self::counter_mask()
    }

    const fn counter_mask() -> u64 {
        (1 << Self::COUNTER_BITS) - 1
    }
}

/// A published message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Identity (also its storage key).
    pub id: MessageId,
    /// Exchange it was published to.
    pub exchange: ShortStr,
    /// Routing key it was published with.
    pub routing_key: ShortStr,
    /// Content header (properties still encoded).
    pub header: ContentHeader,
    /// Body.
    pub body: Bytes,
}

impl Message {
    /// Builds a message from a publish.
    pub fn new(
        id: MessageId,
        exchange: ShortStr,
        routing_key: ShortStr,
        header: ContentHeader,
        body: Bytes,
    ) -> Arc<Message> {
        Arc::new(Message {
            id,
            exchange,
            routing_key,
            header,
            body,
        })
    }

    /// Whether the publisher asked for persistence (delivery mode 2).
    pub fn is_persistent(&self) -> bool {
        self.header.properties.delivery_mode() == Some(2)
    }

    /// Body size in octets.
    pub fn size(&self) -> u64 {
        self.body.len() as u64
    }

    /// The storage encoding.
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len_hint());
        self.encode_into(&mut buf);
        buf.freeze()
    }

    /// A size to reserve for [`Message::encode_into`] (exact unless the
    /// properties are unusually large).
    pub fn encoded_len_hint(&self) -> usize {
        2 + self.exchange.len() + self.routing_key.len() + 4 + 14 + 64 + self.body.len()
    }

    /// Appends the storage encoding to `buf` (no intermediate allocation: the
    /// header is encoded in place and its length patched in).
    pub fn encode_into(&self, buf: &mut BytesMut) {
        put_short(buf, &self.exchange);
        put_short(buf, &self.routing_key);
        let len_at = buf.len();
        buf.put_u32(0);
        self.header.encode(buf);
        let header_len = (buf.len() - len_at - 4) as u32;
        buf[len_at..len_at + 4].copy_from_slice(&header_len.to_be_bytes());
        buf.put_slice(&self.body);
    }

    /// Decodes [`Message::encode`]'s output.
    pub fn decode(id: MessageId, raw: Bytes) -> Result<Message, StoreError> {
        let corrupt = |what: &'static str| StoreError::Corrupt {
            what,
            key: id.0.to_string(),
        };
        let (exchange, rest) = take_short(&raw, 0).ok_or_else(|| corrupt("message exchange"))?;
        let (routing_key, rest) =
            take_short(&raw, rest).ok_or_else(|| corrupt("message routing key"))?;
        let len_bytes = raw
            .get(rest..rest + 4)
            .ok_or_else(|| corrupt("message header"))?;
        let len = u32::from_be_bytes(
            len_bytes
                .try_into()
                .map_err(|_| corrupt("message header"))?,
        );
        let start = rest + 4;
        let end = start
            .checked_add(len as usize)
            .filter(|e| *e <= raw.len())
            .ok_or_else(|| corrupt("message header"))?;
        let header =
            ContentHeader::decode(&raw.slice(start..end)).map_err(|_| corrupt("message header"))?;
        if header.class_id != class_id::BASIC || header.body_size != (raw.len() - end) as u64 {
            return Err(corrupt("message header"));
        }
        Ok(Message {
            id,
            exchange,
            routing_key,
            header,
            body: raw.slice(end..),
        })
    }
}

fn put_short(buf: &mut BytesMut, s: &ShortStr) {
    buf.put_u8(s.len() as u8);
    buf.put_slice(s.as_bytes());
}

fn take_short(raw: &Bytes, at: usize) -> Option<(ShortStr, usize)> {
    let len = *raw.get(at)? as usize;
    let end = at + 1 + len;
    if end > raw.len() {
        return None;
    }
    let s = ShortStr::from_bytes(raw.slice(at + 1..end)).ok()?;
    Some((s, end))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use amqp_codec::BasicProperties;

    /// A persistent message with body `body`, for unit tests of this crate.
    pub(crate) fn sample(id: u64, body: impl Into<Bytes>) -> Arc<Message> {
        let body: Bytes = body.into();
        Message::new(
            MessageId(id),
            ShortStr::from_static("amq.direct"),
            ShortStr::from_static("rk"),
            ContentHeader {
                class_id: class_id::BASIC,
                weight: 0,
                body_size: body.len() as u64,
                properties: BasicProperties {
                    delivery_mode: Some(2),
                    ..Default::default()
                }
                .to_raw()
                .unwrap(),
            },
            body,
        )
    }

    #[test]
    fn storage_encoding_round_trips() {
        let m = sample(9, &b"hello"[..]);
        let back = Message::decode(MessageId(9), m.encode()).unwrap();
        assert_eq!(&back, m.as_ref());
        assert!(back.is_persistent());
    }

    #[test]
    fn corrupt_records_are_errors() {
        let raw = sample(1, &b"x"[..]).encode();
        for cut in 0..raw.len() - 1 {
            assert!(
                Message::decode(MessageId(1), raw.slice(..cut)).is_err(),
                "cut at {cut}"
            );
        }
    }
}
