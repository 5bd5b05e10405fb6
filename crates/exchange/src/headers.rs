//! Headers exchange matching: message headers against binding arguments.
//!
//! `x-match` selects the mode: `all` (the default) or `any`, which ignore
//! binding arguments whose names start with `x-`, and `all-with-x` /
//! `any-with-x`, which compare those too (except `x-match` itself). With no
//! arguments left to compare, `all` matches every message and `any` none.
//! A void binding value matches any message that has the header at all.
//!
//! Values compare as RabbitMQ 3.10 compares them (recorded in
//! `tests/data/headers_rabbitmq_3_10.tsv`): numbers by value whatever their
//! wire type (a signed 32-bit `1` equals a 64-bit `1`, a `1.0` double, a
//! timestamp `1`), long strings and byte arrays by octets, booleans only with
//! booleans, decimals by scale and digits, nested tables and arrays exactly
//! (types included).

use amqp_codec::{FieldTable, FieldValue, ShortStr};

use crate::binding::Target;
use crate::error::ExchangeError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XMatch {
    All,
    Any,
    AllWithX,
    AnyWithX,
}

/// One binding of a headers exchange.
#[derive(Debug, Clone)]
struct HeadersBinding {
    target: Target,
    mode: XMatch,
    /// The arguments that take part in matching.
    args: Vec<(ShortStr, FieldValue)>,
    /// All arguments as bound, to recognise the binding on unbind.
    raw: FieldTable,
}

/// The bindings of one headers exchange.
#[derive(Debug, Default)]
pub(crate) struct HeadersMatcher {
    bindings: Vec<HeadersBinding>,
}

/// RabbitMQ's name for a field type, as its error messages use it.
pub(crate) fn type_name(v: &FieldValue) -> &'static str {
    match v {
        FieldValue::Bool(_) => "bool",
        FieldValue::I8(_) => "byte",
        FieldValue::U8(_) => "unsignedbyte",
        FieldValue::I16(_) => "short",
        FieldValue::U16(_) => "unsignedshort",
        FieldValue::I32(_) => "signedint",
        FieldValue::U32(_) => "unsignedint",
        FieldValue::I64(_) => "long",
        FieldValue::F32(_) => "float",
        FieldValue::F64(_) => "double",
        FieldValue::Decimal { .. } => "decimal",
        FieldValue::LongStr(_) => "longstr",
        FieldValue::Array(_) => "array",
        FieldValue::Timestamp(_) => "timestamp",
        FieldValue::Table(_) => "table",
        FieldValue::Void => "void",
        FieldValue::ByteArray(_) => "binary",
    }
}

fn parse_x_match(args: &FieldTable) -> Result<XMatch, ExchangeError> {
    match args.get("x-match") {
        None => Ok(XMatch::All),
        Some(FieldValue::LongStr(s)) => match &s[..] {
            b"all" => Ok(XMatch::All),
            b"any" => Ok(XMatch::Any),
            b"all-with-x" => Ok(XMatch::AllWithX),
            b"any-with-x" => Ok(XMatch::AnyWithX),
            other => Err(ExchangeError::InvalidXMatchValue(
                String::from_utf8_lossy(other).into_owned(),
            )),
        },
        Some(other) => {
            let value = match other.as_i64() {
                Some(n) => n.to_string(),
                None => format!("{other:?}"),
            };
            Err(ExchangeError::InvalidXMatchType(format!(
                "{} (value {value})",
                type_name(other)
            )))
        }
    }
}

/// Validates a headers binding's arguments without binding anything.
pub(crate) fn validate(args: &FieldTable) -> Result<(), ExchangeError> {
    parse_x_match(args).map(|_| ())
}

enum Num {
    Int(i128),
    Float(f64),
}

fn as_num(v: &FieldValue) -> Option<Num> {
    Some(match *v {
        FieldValue::F32(f) => Num::Float(f.into()),
        FieldValue::F64(f) => Num::Float(f),
        FieldValue::Timestamp(t) => Num::Int(t.into()),
        _ => Num::Int(v.as_i64()?.into()),
    })
}

/// Whether a message header value equals a binding value.
fn value_eq(binding: &FieldValue, header: &FieldValue) -> bool {
    if let (Some(a), Some(b)) = (as_num(binding), as_num(header)) {
        return match (a, b) {
            (Num::Int(a), Num::Int(b)) => a == b,
            (Num::Float(a), Num::Float(b)) => a == b,
            (Num::Int(i), Num::Float(f)) | (Num::Float(f), Num::Int(i)) => (i as f64) == f,
        };
    }
    match (binding, header) {
        (
            FieldValue::LongStr(a) | FieldValue::ByteArray(a),
            FieldValue::LongStr(b) | FieldValue::ByteArray(b),
        ) => a == b,
        // RabbitMQ keeps both as lists, so an empty table equals an empty array.
        (FieldValue::Table(t), FieldValue::Array(a))
        | (FieldValue::Array(a), FieldValue::Table(t)) => t.is_empty() && a.is_empty(),
        _ => binding == header,
    }
}

impl HeadersMatcher {
    pub(crate) fn bind(&mut self, args: &FieldTable, target: Target) -> Result<(), ExchangeError> {
        let mode = parse_x_match(args)?;
        let with_x = matches!(mode, XMatch::AllWithX | XMatch::AnyWithX);
        let matched = args
            .iter()
            .filter(|(k, _)| k.as_str() != "x-match" && (with_x || !k.starts_with("x-")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.bindings.push(HeadersBinding {
            target,
            mode,
            args: matched,
            raw: args.clone(),
        });
        Ok(())
    }

    pub(crate) fn unbind(&mut self, args: &FieldTable, target: Target) {
        if let Some(pos) = self
            .bindings
            .iter()
            .position(|b| b.target == target && b.raw == *args)
        {
            self.bindings.swap_remove(pos);
        }
    }

    pub(crate) fn route(&self, headers: Option<&FieldTable>, out: &mut Vec<Target>) {
        let empty = FieldTable::new();
        let headers = headers.unwrap_or(&empty);
        for b in &self.bindings {
            let matches_arg = |(k, v): &(ShortStr, FieldValue)| match headers.get(k) {
                None => false,
                Some(_) if *v == FieldValue::Void => true,
                Some(h) => value_eq(v, h),
            };
            let matched = match b.mode {
                XMatch::All | XMatch::AllWithX => b.args.iter().all(matches_arg),
                XMatch::Any | XMatch::AnyWithX => b.args.iter().any(matches_arg),
            };
            if matched {
                out.push(b.target);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::QueueId;

    fn table(entries: &[(&'static str, FieldValue)]) -> FieldTable {
        entries
            .iter()
            .map(|(k, v)| (ShortStr::from_static(k), v.clone()))
            .collect()
    }

    fn routes(binding: &FieldTable, headers: Option<&FieldTable>) -> bool {
        let mut m = HeadersMatcher::default();
        m.bind(binding, Target::Queue(QueueId(1))).unwrap();
        let mut out = Vec::new();
        m.route(headers, &mut out);
        !out.is_empty()
    }

    #[test]
    fn modes_and_x_keys() {
        let h = table(&[("a", "1".into()), ("x-k", "v".into())]);
        assert!(routes(&table(&[("a", "1".into())]), Some(&h)));
        assert!(routes(
            &table(&[
                ("x-match", "any".into()),
                ("a", "1".into()),
                ("b", "2".into())
            ]),
            Some(&h)
        ));
        assert!(!routes(
            &table(&[("a", "1".into()), ("b", "2".into())]),
            Some(&h)
        ));
        // x- keys: ignored by all/any, compared by the with-x modes.
        assert!(routes(
            &table(&[("x-match", "all".into()), ("x-k", "other".into())]),
            Some(&h)
        ));
        assert!(!routes(
            &table(&[("x-match", "all-with-x".into()), ("x-k", "other".into())]),
            Some(&h)
        ));
        assert!(routes(
            &table(&[("x-match", "any-with-x".into()), ("x-k", "v".into())]),
            Some(&h)
        ));
        assert!(!routes(
            &table(&[("x-match", "any".into()), ("x-k", "v".into())]),
            Some(&h)
        ));
        // Nothing to compare: all matches, any does not, even without headers.
        assert!(routes(&FieldTable::new(), None));
        assert!(!routes(&table(&[("x-match", "any".into())]), None));
    }

    #[test]
    fn void_matches_on_presence_and_numbers_by_value() {
        let h = table(&[("a", FieldValue::I64(1)), ("s", "1".into())]);
        assert!(routes(&table(&[("a", FieldValue::Void)]), Some(&h)));
        assert!(!routes(&table(&[("z", FieldValue::Void)]), Some(&h)));
        assert!(routes(&table(&[("a", FieldValue::I32(1))]), Some(&h)));
        assert!(routes(&table(&[("a", FieldValue::F64(1.0))]), Some(&h)));
        assert!(!routes(&table(&[("a", FieldValue::Bool(true))]), Some(&h)));
        assert!(!routes(&table(&[("s", FieldValue::I32(1))]), Some(&h)));
        assert!(routes(
            &table(&[("s", FieldValue::ByteArray("1".as_bytes().into()))]),
            Some(&h)
        ));
    }

    #[test]
    fn invalid_x_match_is_refused_with_rabbitmq_wording() {
        let e = validate(&table(&[("x-match", "foo".into())])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid x-match field value <<\"foo\">>; expected all, any, all-with-x, or any-with-x"
        );
        assert_eq!(e.reply_code(), 406);
        let e = validate(&table(&[("x-match", FieldValue::I32(1))])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid x-match field type signedint (value 1); expected longstr"
        );
    }
}
