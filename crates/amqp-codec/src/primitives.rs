//! Parsers and writers for the wire primitives that are not plain integers:
//! short strings, long strings.
//!
//! Parsers are `nom` functions over `&[u8]` with [`Malformed`] as the error, so
//! running out of input is an error value, never a panic. Variable-length
//! values are returned as zero-copy slices of `src`, the `Bytes` that the input
//! slice points into (`Bytes::slice_ref`).

use bytes::{BufMut, Bytes, BytesMut};
use nom::Parser;
use nom::bytes::complete::take;
use nom::number::complete::{be_u8, be_u32};

use crate::error::{CodecError, Malformed};
use crate::types::ShortStr;

/// Result of a parser in this crate.
pub(crate) type PResult<'a, T> = nom::IResult<&'a [u8], T, Malformed>;

/// `shortstr`: a length octet then that many UTF-8 octets.
pub(crate) fn short_str<'a>(src: &Bytes, i: &'a [u8]) -> PResult<'a, ShortStr> {
    let (i, len) = be_u8(i)?;
    let (i, raw) = take(len).parse(i)?;
    if std::str::from_utf8(raw).is_err() {
        return Err(nom::Err::Failure(Malformed::InvalidUtf8));
    }
    Ok((i, ShortStr::from_checked(src.slice_ref(raw))))
}

/// `longstr`: a 32-bit length then that many octets (binary, not checked).
pub(crate) fn long_str<'a>(src: &Bytes, i: &'a [u8]) -> PResult<'a, Bytes> {
    let (i, len) = be_u32(i)?;
    let (i, raw) = take(len).parse(i)?;
    Ok((i, src.slice_ref(raw)))
}

/// Writes a `shortstr`. Cannot fail: [`ShortStr`] is at most 255 octets by construction.
pub(crate) fn put_short_str(buf: &mut BytesMut, s: &ShortStr) {
    // `ShortStr::MAX_LEN` is 255, so the length always fits the octet.
    buf.put_u8(u8::try_from(s.len()).unwrap_or(u8::MAX));
    buf.put_slice(s.as_bytes());
}

/// Writes a `longstr`.
pub(crate) fn put_long_str(buf: &mut BytesMut, s: &[u8]) -> Result<(), CodecError> {
    let len = u32::try_from(s.len())
        .map_err(|_| CodecError::too_long("long string", s.len(), u64::from(u32::MAX)))?;
    buf.put_u32(len);
    buf.put_slice(s);
    Ok(())
}

/// Reserves a 32-bit length prefix at the current end of `buf`; returns its position.
pub(crate) fn begin_length_prefix(buf: &mut BytesMut) -> usize {
    let pos = buf.len();
    buf.put_u32(0);
    pos
}

/// Fills in a prefix from [`begin_length_prefix`] with the number of octets written since.
pub(crate) fn end_length_prefix(
    buf: &mut BytesMut,
    pos: usize,
    what: &'static str,
) -> Result<(), CodecError> {
    let len = buf.len().saturating_sub(pos + 4);
    let len32 =
        u32::try_from(len).map_err(|_| CodecError::too_long(what, len, u64::from(u32::MAX)))?;
    if let Some(slot) = buf.get_mut(pos..pos + 4) {
        slot.copy_from_slice(&len32.to_be_bytes());
    }
    Ok(())
}
