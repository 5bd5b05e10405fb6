//! Field tables (`F`) and field arrays (`A`): the typed key/value maps that carry
//! method arguments (`x-message-ttl`, ...), client properties and message headers.
//!
//! Type octets follow RabbitMQ's reading of the spec, not the spec's own table:
//! `t` bool, `b` i8, `B` u8, `s` **i16**, `u` u16, `I` i32, `i` u32,
//! `l` **i64**, `f` f32, `d` f64, `D` decimal, `S` long string, `A` array,
//! `T` timestamp, `F` table, `V` void, `x` byte array.
//!
//! A table keeps its entries in wire order (a `Vec`, not a map) so that
//! re-encoding reproduces the peer's bytes exactly and small tables, the common
//! case, are searched faster than they could be hashed. Decoding never
//! allocates more than the frame it reads from actually contains: every entry
//! consumes at least two input octets, and nesting is capped at [`MAX_NESTING`]
//! so a hostile frame cannot exhaust the stack.

use bytes::{BufMut, Bytes, BytesMut};
use nom::Parser;
use nom::bytes::complete::take;
use nom::number::complete::{
    be_f32, be_f64, be_i8, be_i16, be_i32, be_i64, be_u8, be_u16, be_u32, be_u64,
};

use crate::error::{CodecError, Malformed};
use crate::primitives::{
    PResult, begin_length_prefix, end_length_prefix, long_str, put_long_str, put_short_str,
    short_str,
};
use crate::types::ShortStr;

/// How deeply tables and arrays may nest inside each other (the outermost counts as 1).
pub const MAX_NESTING: usize = 64;

/// A value in a field table or array.
#[derive(Debug, Clone)]
pub enum FieldValue {
    /// `t`
    Bool(bool),
    /// `b`
    I8(i8),
    /// `B`
    U8(u8),
    /// `s` (RabbitMQ: signed 16-bit)
    I16(i16),
    /// `u`
    U16(u16),
    /// `I`
    I32(i32),
    /// `i`
    U32(u32),
    /// `l` (RabbitMQ: signed 64-bit)
    I64(i64),
    /// `f`
    F32(f32),
    /// `d`
    F64(f64),
    /// `D`: `value / 10^scale`
    Decimal {
        /// Number of decimal digits after the point.
        scale: u8,
        /// Unscaled value.
        value: u32,
    },
    /// `S`: binary-safe long string.
    LongStr(Bytes),
    /// `A`
    Array(Vec<FieldValue>),
    /// `T`: seconds since the Unix epoch.
    Timestamp(u64),
    /// `F`
    Table(FieldTable),
    /// `V`: no value (matches on presence in headers exchanges).
    Void,
    /// `x`: RabbitMQ's byte array.
    ByteArray(Bytes),
}

// Floats compare by bit pattern, so NaN payloads round-trip and equality is reflexive.
impl PartialEq for FieldValue {
    fn eq(&self, other: &Self) -> bool {
        use FieldValue::*;
        match (self, other) {
            (Bool(a), Bool(b)) => a == b,
            (I8(a), I8(b)) => a == b,
            (U8(a), U8(b)) => a == b,
            (I16(a), I16(b)) => a == b,
            (U16(a), U16(b)) => a == b,
            (I32(a), I32(b)) => a == b,
            (U32(a), U32(b)) => a == b,
            (I64(a), I64(b)) => a == b,
            (F32(a), F32(b)) => a.to_bits() == b.to_bits(),
            (F64(a), F64(b)) => a.to_bits() == b.to_bits(),
            (
                Decimal { scale, value },
                Decimal {
                    scale: s2,
                    value: v2,
                },
            ) => scale == s2 && value == v2,
            (LongStr(a), LongStr(b)) => a == b,
            (Array(a), Array(b)) => a == b,
            (Timestamp(a), Timestamp(b)) => a == b,
            (Table(a), Table(b)) => a == b,
            (Void, Void) => true,
            (ByteArray(a), ByteArray(b)) => a == b,
            _ => false,
        }
    }
}

impl FieldValue {
    /// The type octet this value is encoded with.
    pub fn type_octet(&self) -> u8 {
        match self {
            FieldValue::Bool(_) => b't',
            FieldValue::I8(_) => b'b',
            FieldValue::U8(_) => b'B',
            FieldValue::I16(_) => b's',
            FieldValue::U16(_) => b'u',
            FieldValue::I32(_) => b'I',
            FieldValue::U32(_) => b'i',
            FieldValue::I64(_) => b'l',
            FieldValue::F32(_) => b'f',
            FieldValue::F64(_) => b'd',
            FieldValue::Decimal { .. } => b'D',
            FieldValue::LongStr(_) => b'S',
            FieldValue::Array(_) => b'A',
            FieldValue::Timestamp(_) => b'T',
            FieldValue::Table(_) => b'F',
            FieldValue::Void => b'V',
            FieldValue::ByteArray(_) => b'x',
        }
    }

    /// The value as a signed integer, if it is one of the integer types.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            FieldValue::I8(v) => Some(v.into()),
            FieldValue::U8(v) => Some(v.into()),
            FieldValue::I16(v) => Some(v.into()),
            FieldValue::U16(v) => Some(v.into()),
            FieldValue::I32(v) => Some(v.into()),
            FieldValue::U32(v) => Some(v.into()),
            FieldValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string, if it is a UTF-8 long string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::LongStr(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// Encodes the type octet and the value.
    pub fn encode(&self, buf: &mut BytesMut) -> Result<(), CodecError> {
        buf.put_u8(self.type_octet());
        match self {
            FieldValue::Bool(v) => buf.put_u8(u8::from(*v)),
            FieldValue::I8(v) => buf.put_i8(*v),
            FieldValue::U8(v) => buf.put_u8(*v),
            FieldValue::I16(v) => buf.put_i16(*v),
            FieldValue::U16(v) => buf.put_u16(*v),
            FieldValue::I32(v) => buf.put_i32(*v),
            FieldValue::U32(v) => buf.put_u32(*v),
            FieldValue::I64(v) => buf.put_i64(*v),
            FieldValue::F32(v) => buf.put_f32(*v),
            FieldValue::F64(v) => buf.put_f64(*v),
            FieldValue::Decimal { scale, value } => {
                buf.put_u8(*scale);
                buf.put_u32(*value);
            }
            FieldValue::LongStr(b) | FieldValue::ByteArray(b) => put_long_str(buf, b)?,
            FieldValue::Array(values) => encode_array(values, buf)?,
            FieldValue::Timestamp(v) => buf.put_u64(*v),
            FieldValue::Table(t) => t.encode(buf)?,
            FieldValue::Void => {}
        }
        Ok(())
    }
}

impl From<&str> for FieldValue {
    fn from(s: &str) -> Self {
        FieldValue::LongStr(Bytes::copy_from_slice(s.as_bytes()))
    }
}

/// A field table: ordered `shortstr` keys with typed values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldTable(Vec<(ShortStr, FieldValue)>);

impl FieldTable {
    /// An empty table.
    pub fn new() -> Self {
        FieldTable(Vec::new())
    }

    /// The value under `key` (the first, should a peer have sent duplicates).
    pub fn get(&self, key: &str) -> Option<&FieldValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Sets `key`, replacing an existing entry in place or appending a new one.
    pub fn insert(&mut self, key: ShortStr, value: FieldValue) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }

    /// Removes and returns the value under `key`.
    pub fn remove(&mut self, key: &str) -> Option<FieldValue> {
        let pos = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(pos).1)
    }

    /// Entries in wire order.
    pub fn iter(&self) -> impl Iterator<Item = (&ShortStr, &FieldValue)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Encodes the table with its 32-bit length prefix.
    pub fn encode(&self, buf: &mut BytesMut) -> Result<(), CodecError> {
        let pos = begin_length_prefix(buf);
        for (k, v) in &self.0 {
            put_short_str(buf, k);
            v.encode(buf)?;
        }
        end_length_prefix(buf, pos, "field table")
    }

    /// Decodes a table (with its length prefix) from a complete buffer, e.g. a
    /// stored message's headers.
    pub fn decode(src: &Bytes) -> Result<(FieldTable, usize), Malformed> {
        let (rest, table) = field_table(src, src, 0)?;
        Ok((table, src.len() - rest.len()))
    }
}

impl FromIterator<(ShortStr, FieldValue)> for FieldTable {
    fn from_iter<T: IntoIterator<Item = (ShortStr, FieldValue)>>(iter: T) -> Self {
        let mut t = FieldTable::new();
        for (k, v) in iter {
            t.insert(k, v);
        }
        t
    }
}

impl IntoIterator for FieldTable {
    type Item = (ShortStr, FieldValue);
    type IntoIter = std::vec::IntoIter<(ShortStr, FieldValue)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

fn encode_array(values: &[FieldValue], buf: &mut BytesMut) -> Result<(), CodecError> {
    let pos = begin_length_prefix(buf);
    for v in values {
        v.encode(buf)?;
    }
    end_length_prefix(buf, pos, "field array")
}

/// Parses a length-prefixed field table. `depth` is the nesting level of the
/// enclosing value (0 at the top).
pub(crate) fn field_table<'a>(src: &Bytes, i: &'a [u8], depth: usize) -> PResult<'a, FieldTable> {
    if depth >= MAX_NESTING {
        return Err(nom::Err::Failure(Malformed::NestingTooDeep));
    }
    let (i, len) = be_u32(i)?;
    let (rest, mut body) = take(len).parse(i)?;
    let mut entries = Vec::new();
    while !body.is_empty() {
        let (b, key) = short_str(src, body)?;
        let (b, value) = field_value(src, b, depth + 1)?;
        entries.push((key, value));
        body = b;
    }
    Ok((rest, FieldTable(entries)))
}

fn field_array<'a>(src: &Bytes, i: &'a [u8], depth: usize) -> PResult<'a, Vec<FieldValue>> {
    if depth >= MAX_NESTING {
        return Err(nom::Err::Failure(Malformed::NestingTooDeep));
    }
    let (i, len) = be_u32(i)?;
    let (rest, mut body) = take(len).parse(i)?;
    let mut values = Vec::new();
    while !body.is_empty() {
        let (b, value) = field_value(src, body, depth + 1)?;
        values.push(value);
        body = b;
    }
    Ok((rest, values))
}

fn field_value<'a>(src: &Bytes, i: &'a [u8], depth: usize) -> PResult<'a, FieldValue> {
    let (i, ty) = be_u8(i)?;
    Ok(match ty {
        b't' => {
            let (i, v) = be_u8(i)?;
            (i, FieldValue::Bool(v != 0))
        }
        b'b' => be_i8(i).map(|(i, v)| (i, FieldValue::I8(v)))?,
        b'B' => be_u8(i).map(|(i, v)| (i, FieldValue::U8(v)))?,
        b's' => be_i16(i).map(|(i, v)| (i, FieldValue::I16(v)))?,
        b'u' => be_u16(i).map(|(i, v)| (i, FieldValue::U16(v)))?,
        b'I' => be_i32(i).map(|(i, v)| (i, FieldValue::I32(v)))?,
        b'i' => be_u32(i).map(|(i, v)| (i, FieldValue::U32(v)))?,
        b'l' => be_i64(i).map(|(i, v)| (i, FieldValue::I64(v)))?,
        b'f' => be_f32(i).map(|(i, v)| (i, FieldValue::F32(v)))?,
        b'd' => be_f64(i).map(|(i, v)| (i, FieldValue::F64(v)))?,
        b'D' => {
            let (i, scale) = be_u8(i)?;
            let (i, value) = be_u32(i)?;
            (i, FieldValue::Decimal { scale, value })
        }
        b'S' => long_str(src, i).map(|(i, v)| (i, FieldValue::LongStr(v)))?,
        b'x' => long_str(src, i).map(|(i, v)| (i, FieldValue::ByteArray(v)))?,
        b'A' => field_array(src, i, depth).map(|(i, v)| (i, FieldValue::Array(v)))?,
        b'T' => be_u64(i).map(|(i, v)| (i, FieldValue::Timestamp(v)))?,
        b'F' => field_table(src, i, depth).map(|(i, v)| (i, FieldValue::Table(v)))?,
        b'V' => (i, FieldValue::Void),
        other => return Err(nom::Err::Failure(Malformed::UnknownFieldType(other))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(t: &FieldTable) -> FieldTable {
        let mut buf = BytesMut::new();
        t.encode(&mut buf).unwrap();
        let bytes = buf.freeze();
        let (decoded, used) = FieldTable::decode(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        decoded
    }

    #[test]
    fn every_type_round_trips() {
        let nested: FieldTable = [(ShortStr::from_static("k"), FieldValue::Void)]
            .into_iter()
            .collect();
        let t: FieldTable = [
            ("t", FieldValue::Bool(true)),
            ("b", FieldValue::I8(-3)),
            ("B", FieldValue::U8(250)),
            ("s", FieldValue::I16(-300)),
            ("u", FieldValue::U16(60000)),
            ("I", FieldValue::I32(-70000)),
            ("i", FieldValue::U32(4_000_000_000)),
            ("l", FieldValue::I64(-5_000_000_000)),
            ("f", FieldValue::F32(1.5)),
            ("d", FieldValue::F64(f64::NAN)),
            (
                "D",
                FieldValue::Decimal {
                    scale: 2,
                    value: 314,
                },
            ),
            ("S", FieldValue::from("hello")),
            (
                "A",
                FieldValue::Array(vec![FieldValue::I32(1), FieldValue::from("x")]),
            ),
            ("T", FieldValue::Timestamp(1_700_000_000)),
            ("F", FieldValue::Table(nested)),
            ("V", FieldValue::Void),
            ("x", FieldValue::ByteArray(Bytes::from_static(&[0, 255]))),
        ]
        .into_iter()
        .map(|(k, v)| (ShortStr::from_static(k), v))
        .collect();
        assert_eq!(roundtrip(&t), t);
    }

    #[test]
    fn rabbitmq_type_letters() {
        // `s` is a signed 16-bit and `l` a signed 64-bit integer, as RabbitMQ reads them.
        let mut buf = BytesMut::new();
        let body = b"\x01as\xff\xfe\x01bl\xff\xff\xff\xff\xff\xff\xff\xff";
        buf.put_u32(body.len() as u32);
        buf.put_slice(body);
        let (t, _) = FieldTable::decode(&buf.freeze()).unwrap();
        assert_eq!(t.get("a"), Some(&FieldValue::I16(-2)));
        assert_eq!(t.get("b"), Some(&FieldValue::I64(-1)));
    }

    #[test]
    fn unknown_type_octet_is_malformed() {
        let src = Bytes::from_static(b"\x00\x00\x00\x03\x01aZ");
        assert_eq!(
            FieldTable::decode(&src).unwrap_err(),
            Malformed::UnknownFieldType(b'Z')
        );
    }

    #[test]
    fn nesting_is_capped_without_overflowing_the_stack() {
        // 10_000 nested arrays: far deeper than MAX_NESTING.
        let depth = 10_000usize;
        let mut inner = BytesMut::new();
        for _ in 0..depth {
            let mut outer = BytesMut::new();
            outer.put_u8(b'A');
            outer.put_u32(inner.len() as u32);
            outer.put_slice(&inner);
            inner = outer;
        }
        let mut table = BytesMut::new();
        table.put_u32(inner.len() as u32 + 2);
        table.put_u8(1);
        table.put_u8(b'k');
        table.put_slice(&inner);
        assert_eq!(
            FieldTable::decode(&table.freeze()).unwrap_err(),
            Malformed::NestingTooDeep
        );
    }

    #[test]
    fn claimed_length_beyond_input_is_truncated_not_allocated() {
        let src = Bytes::from_static(b"\xff\xff\xff\xff\x01a");
        assert_eq!(FieldTable::decode(&src).unwrap_err(), Malformed::Truncated);
    }

    #[test]
    fn insert_replaces_in_place() {
        let mut t = FieldTable::new();
        t.insert(ShortStr::from_static("a"), FieldValue::I32(1));
        t.insert(ShortStr::from_static("b"), FieldValue::I32(2));
        t.insert(ShortStr::from_static("a"), FieldValue::I32(3));
        let keys: Vec<_> = t.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(t.get("a"), Some(&FieldValue::I32(3)));
        assert_eq!(t.remove("a"), Some(FieldValue::I32(3)));
        assert_eq!(t.len(), 1);
    }
}
