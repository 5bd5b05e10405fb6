//! The content header frame's payload: class id, body size and properties.

use bytes::{BufMut, Bytes, BytesMut};
use nom::number::complete::{be_u16, be_u64};

use crate::error::{CodecError, Malformed};
use crate::properties::{BasicProperties, RawProperties};

/// A decoded content header. Properties stay encoded ([`RawProperties`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContentHeader {
    /// Class of the method this content belongs to (60 = basic).
    pub class_id: u16,
    /// Unused by AMQP 0-9-1; must be 0.
    pub weight: u16,
    /// Total size of the body frames that follow.
    pub body_size: u64,
    /// The properties, still encoded.
    pub properties: RawProperties,
}

impl ContentHeader {
    /// Decodes a header frame's payload. Properties are validated but not decoded.
    #[inline]
    pub fn decode(payload: &Bytes) -> Result<ContentHeader, CodecError> {
        Self::parse(payload).map_err(CodecError::MalformedContentHeader)
    }

    #[inline]
    fn parse(payload: &Bytes) -> Result<ContentHeader, Malformed> {
        let (i, class_id) = be_u16::<_, Malformed>(payload.as_ref())?;
        let (i, weight) = be_u16::<_, Malformed>(i)?;
        let (i, body_size) = be_u64::<_, Malformed>(i)?;
        let properties = RawProperties::parse(payload, i)?;
        Ok(ContentHeader {
            class_id,
            weight,
            body_size,
            properties,
        })
    }

    /// This header with its properties changed by `change` (decoded,
    /// changed, encoded again): how a broker rewrites a message's
    /// properties (reply-to, BCC, x-delivery-count, ...). If they do not
    /// decode or no longer encode, the header is returned unchanged.
    pub fn with_properties(self, change: impl FnOnce(&mut BasicProperties)) -> ContentHeader {
        let Ok(mut props) = self.properties.decode() else {
            return self;
        };
        change(&mut props);
        match props.to_raw() {
            Ok(properties) => ContentHeader { properties, ..self },
            Err(_) => self,
        }
    }

    /// Encodes the payload (without the frame envelope).
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u16(self.class_id);
        buf.put_u16(self.weight);
        buf.put_u64(self.body_size);
        self.properties.encode(buf);
    }
}
