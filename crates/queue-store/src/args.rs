//! Queue arguments (`x-message-ttl`, `x-max-length`, ...): parsing with
//! RabbitMQ's names, validation with its error wording, and the equivalence
//! check a redeclare must pass.

use amqp_codec::{FieldTable, FieldValue, ShortStr};

use crate::error::{ArgError, ArgProblem};

/// What a full queue does with one more message (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop (dead-letter) messages from the head (the default).
    #[default]
    DropHead,
    /// Refuse the publish (`basic.nack` to confirming publishers).
    RejectPublish,
    /// Refuse the publish and dead-letter the refused message.
    RejectPublishDlx,
}

/// What happens to a quorum queue's dead letters on their way
/// (`x-dead-letter-strategy`, or a policy's `dead-letter-strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeadLetterStrategy {
    /// Routed once; lost if nothing takes them (the default).
    #[default]
    AtMostOnce,
    /// Held by the queue until the queues they route to have them
    /// (with `x-overflow: reject-publish`; otherwise as at-most-once, as
    /// RabbitMQ does).
    AtLeastOnce,
}

/// A queue's parsed arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueArgs {
    /// `x-message-ttl`, milliseconds.
    pub message_ttl: Option<u64>,
    /// `x-expires`: delete the queue after this many unused milliseconds.
    pub expires: Option<u64>,
    /// `x-max-length`: ready messages.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`: ready message body octets.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`.
    pub overflow: Overflow,
    /// `x-dead-letter-exchange`.
    pub dead_letter_exchange: Option<ShortStr>,
    /// `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<ShortStr>,
    /// `x-max-priority` (1–255): a priority queue.
    pub max_priority: Option<u8>,
    /// `x-delivery-limit`: deliveries after which a message is dead-lettered.
    pub delivery_limit: Option<u64>,
    /// `x-single-active-consumer`.
    pub single_active_consumer: bool,
    /// `x-consumer-timeout`, milliseconds.
    pub consumer_timeout: Option<u64>,
    /// `x-queue-type`.
    pub queue_type: QueueType,
    /// `x-dead-letter-strategy` (quorum queues; ignored by classic ones).
    pub dead_letter_strategy: DeadLetterStrategy,
}

/// RabbitMQ's name for a field type, as its error messages use it.
pub fn type_name(v: &FieldValue) -> &'static str {
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

/// The arguments compared when a queue is redeclared, in RabbitMQ's order.
pub const EQUIVALENCE_ARGS: [&str; 11] = [
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-single-active-consumer",
    "x-delivery-limit",
];

/// RabbitMQ's longest accepted duration: ten years in milliseconds.
const MAX_DURATION_MS: i64 = 315_360_000_000;

/// The queue type asked for with `x-queue-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// `classic` (the default).
    #[default]
    Classic,
    /// `quorum`: accepted for compatibility and served by the same queue
    /// implementation, with RabbitMQ's property rules (durable, not
    /// exclusive, not auto-delete).
    Quorum,
}

struct Parser<'a> {
    args: &'a FieldTable,
    queue: &'a str,
    vhost: &'a str,
}

impl Parser<'_> {
    fn err(&self, arg: &'static str, problem: ArgProblem) -> ArgError {
        ArgError::Invalid {
            arg,
            queue: self.queue.to_owned(),
            vhost: self.vhost.to_owned(),
            problem,
        }
    }

    fn int(&self, arg: &'static str) -> Result<Option<i64>, ArgError> {
        match self.args.get(arg) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.err(arg, ArgProblem::ExpectedInteger(type_name(v)))),
        }
    }

    fn non_negative(&self, arg: &'static str) -> Result<Option<u64>, ArgError> {
        match self.int(arg)? {
            Some(v) if v < 0 => Err(self.err(arg, ArgProblem::Negative(v))),
            v => Ok(v.map(|v| v as u64)),
        }
    }

    fn duration(&self, arg: &'static str, zero_allowed: bool) -> Result<Option<u64>, ArgError> {
        match self.int(arg)? {
            Some(v) if v < 0 => Err(self.err(arg, ArgProblem::Negative(v))),
            Some(0) if !zero_allowed => Err(self.err(arg, ArgProblem::Zero)),
            Some(v) if v > MAX_DURATION_MS => Err(self.err(arg, ArgProblem::TooLarge(v))),
            v => Ok(v.map(|v| v as u64)),
        }
    }

    fn string(&self, arg: &'static str) -> Result<Option<ShortStr>, ArgError> {
        match self.args.get(arg) {
            None => Ok(None),
            Some(FieldValue::LongStr(s)) => ShortStr::from_bytes(s.clone())
                .map(Some)
                .map_err(|_| self.err(arg, ArgProblem::UnacceptableType("longstr"))),
            Some(v) => Err(self.err(arg, ArgProblem::UnacceptableType(type_name(v)))),
        }
    }

    /// What RabbitMQ 3.10 refuses in a quorum queue's arguments (recorded
    /// in `tests/data/rabbitmq_3_10_quorum.md`).
    fn check_quorum(&self) -> Result<(), ArgError> {
        for arg in ["x-max-priority", "x-queue-mode", "x-queue-master-locator"] {
            if self.args.get(arg).is_some() {
                return Err(ArgError::NotForQueueType {
                    arg,
                    queue: self.queue.to_owned(),
                    vhost: self.vhost.to_owned(),
                    queue_type: "rabbit_quorum_queue",
                });
            }
        }
        if let Some(l) = self.string("x-queue-leader-locator")? {
            if !matches!(l.as_str(), "client-local" | "balanced") {
                return Err(self.err("x-queue-leader-locator", ArgProblem::InvalidQueueLocator));
            }
        }
        match self.int("x-quorum-initial-group-size")? {
            Some(v) if v < 0 => {
                return Err(self.err("x-quorum-initial-group-size", ArgProblem::Negative(v)));
            }
            Some(0) => return Err(self.err("x-quorum-initial-group-size", ArgProblem::Zero)),
            _ => {}
        }
        if let Some(s) = self.string("x-dead-letter-strategy")? {
            if !matches!(s.as_str(), "at-most-once" | "at-least-once") {
                return Err(self.err("x-dead-letter-strategy", ArgProblem::InvalidDlxStrategy));
            }
        }
        Ok(())
    }

    fn boolean(&self, arg: &'static str) -> Result<bool, ArgError> {
        match self.args.get(arg) {
            None => Ok(false),
            Some(FieldValue::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(arg, ArgProblem::UnacceptableType(type_name(v)))),
        }
    }
}

impl DeadLetterStrategy {
    /// The strategy a queue's declare arguments name, if they name one
    /// (what a policy cannot override).
    pub fn declared(arguments: &FieldTable) -> Option<DeadLetterStrategy> {
        match arguments.get("x-dead-letter-strategy")? {
            FieldValue::LongStr(s) if s.as_ref() == b"at-least-once" => {
                Some(DeadLetterStrategy::AtLeastOnce)
            }
            _ => Some(DeadLetterStrategy::AtMostOnce),
        }
    }
}

impl QueueArgs {
    /// Parses and validates `x-` arguments of `queue.declare`. Unknown
    /// arguments are ignored, as RabbitMQ does.
    pub fn parse(args: &FieldTable, queue: &str, vhost: &str) -> Result<QueueArgs, ArgError> {
        let p = Parser { args, queue, vhost };
        let queue_type = match p.string("x-queue-type")? {
            None => QueueType::Classic,
            Some(t) => match t.as_str() {
                "classic" => QueueType::Classic,
                "quorum" => QueueType::Quorum,
                other => {
                    return Err(p.err(
                        "x-queue-type",
                        ArgProblem::UnsupportedQueueType(other.to_owned()),
                    ));
                }
            },
        };
        let quorum = queue_type == QueueType::Quorum;
        if quorum {
            p.check_quorum()?;
        }
        let overflow = match p.string("x-overflow")? {
            None => Overflow::DropHead,
            Some(s) => match s.as_str() {
                "drop-head" => Overflow::DropHead,
                "reject-publish" => Overflow::RejectPublish,
                "reject-publish-dlx" => Overflow::RejectPublishDlx,
                _ => return Err(p.err("x-overflow", ArgProblem::InvalidOverflow)),
            },
        };
        let max_priority = match p.non_negative("x-max-priority")? {
            Some(v) if v > 255 => {
                return Err(p.err("x-max-priority", ArgProblem::MaxValueExceeded(v as i64)));
            }
            Some(0) | None => None,
            Some(v) => Some(v as u8),
        };
        let dead_letter_exchange = match args.get("x-dead-letter-exchange") {
            None => None,
            Some(FieldValue::LongStr(s)) => ShortStr::from_bytes(s.clone()).ok(),
            Some(v) => {
                return Err(ArgError::InvalidType {
                    arg: "x-dead-letter-exchange",
                    type_name: type_name(v),
                    queue: queue.to_owned(),
                    vhost: vhost.to_owned(),
                });
            }
        };
        let dead_letter_routing_key = p.string("x-dead-letter-routing-key")?;
        if dead_letter_routing_key.is_some() && dead_letter_exchange.is_none() {
            return Err(p.err("x-dead-letter-routing-key", ArgProblem::RoutingKeyButNoDlx));
        }
        if let Some(mode) = p.string("x-queue-mode")? {
            if !matches!(mode.as_str(), "default" | "lazy") {
                return Err(p.err(
                    "x-queue-mode",
                    ArgProblem::UnsupportedQueueMode(mode.to_string()),
                ));
            }
        }
        // A quorum queue takes a negative delivery limit as none (as
        // RabbitMQ 3.10 accepts it).
        let delivery_limit = match p.int("x-delivery-limit")? {
            Some(v) if v < 0 && quorum => None,
            _ => p.non_negative("x-delivery-limit")?,
        };
        Ok(QueueArgs {
            message_ttl: p.duration("x-message-ttl", true)?,
            expires: p.duration("x-expires", false)?,
            max_length: p.non_negative("x-max-length")?,
            max_length_bytes: p.non_negative("x-max-length-bytes")?,
            overflow,
            dead_letter_exchange,
            dead_letter_routing_key,
            max_priority,
            delivery_limit,
            single_active_consumer: p.boolean("x-single-active-consumer")?,
            consumer_timeout: p.non_negative("x-consumer-timeout")?,
            queue_type,
            // (Checked for quorum queues above; a classic queue ignores it.)
            dead_letter_strategy: DeadLetterStrategy::declared(args).unwrap_or_default(),
        })
    }

    /// Checks the declare's flags against the queue type: a quorum queue must
    /// be durable, not exclusive and not auto-delete (RabbitMQ's rules).
    pub fn check_properties(
        &self,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        queue: &str,
        vhost: &str,
    ) -> Result<(), ArgError> {
        if self.queue_type != QueueType::Quorum {
            return Ok(());
        }
        let property = if !durable {
            "non-durable"
        } else if exclusive {
            "exclusive-owner"
        } else if auto_delete {
            "auto-delete"
        } else {
            return Ok(());
        };
        Err(ArgError::InvalidProperty {
            property,
            queue: queue.to_owned(),
            vhost: vhost.to_owned(),
        })
    }
}

/// Describes a value as RabbitMQ's inequivalence messages do.
fn describe(v: Option<&FieldValue>) -> String {
    match v {
        None => "none".to_owned(),
        Some(v) => {
            let shown = match v {
                FieldValue::LongStr(s) => String::from_utf8_lossy(s).into_owned(),
                FieldValue::Bool(b) => b.to_string(),
                other => other
                    .as_i64()
                    .map_or_else(|| format!("{other:?}"), |n| n.to_string()),
            };
            format!("the value '{shown}' of type '{}'", type_name(v))
        }
    }
}

/// The first of [`EQUIVALENCE_ARGS`] whose value differs between an existing
/// queue's arguments and a redeclare's, described as
/// `(arg, received, current)` for the 406 message. The queue type comes
/// first: a classic queue is classic with or without `x-queue-type`; any
/// other type must be named again (RabbitMQ 3.10's texts, recorded in
/// `tests/data/rabbitmq_3_10_quorum.md`).
pub fn first_difference(
    current: &FieldTable,
    received: &FieldTable,
) -> Option<(&'static str, String, String)> {
    const TYPE: &str = "x-queue-type";
    let type_of = |v: Option<&FieldValue>| match v {
        Some(FieldValue::LongStr(s)) => String::from_utf8_lossy(s).into_owned(),
        Some(other) => format!("{other:?}"),
        None => "classic".to_owned(),
    };
    let (c, r) = (current.get(TYPE), received.get(TYPE));
    let current_type = type_of(c);
    match r {
        Some(_) if type_of(r) != current_type => {
            return Some((
                TYPE,
                format!("'{}'", type_of(r)),
                format!("'{current_type}'"),
            ));
        }
        None if current_type != "classic" => return Some((TYPE, describe(None), describe(c))),
        _ => {}
    }
    EQUIVALENCE_ARGS.iter().find_map(|&arg| {
        let (c, r) = (current.get(arg), received.get(arg));
        let same = match (c, r) {
            (Some(c), Some(r)) => c.as_i64().zip(r.as_i64()).map_or(c == r, |(a, b)| a == b),
            (None, None) => true,
            _ => false,
        };
        (!same).then(|| (arg, describe(r), describe(c)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&'static str, FieldValue)]) -> FieldTable {
        entries
            .iter()
            .map(|(k, v)| (ShortStr::from_static(k), v.clone()))
            .collect()
    }

    fn parse(entries: &[(&'static str, FieldValue)]) -> Result<QueueArgs, ArgError> {
        QueueArgs::parse(&table(entries), "q", "/")
    }

    #[test]
    fn parses_every_argument() {
        let a = parse(&[
            ("x-message-ttl", FieldValue::I32(1000)),
            ("x-expires", FieldValue::I64(60_000)),
            ("x-max-length", FieldValue::U8(10)),
            ("x-max-length-bytes", FieldValue::I32(1 << 20)),
            ("x-overflow", "reject-publish-dlx".into()),
            ("x-dead-letter-exchange", "dlx".into()),
            ("x-dead-letter-routing-key", "dead".into()),
            ("x-max-priority", FieldValue::I32(10)),
            ("x-delivery-limit", FieldValue::I32(3)),
            ("x-single-active-consumer", FieldValue::Bool(true)),
            ("x-unknown", "ignored".into()),
        ])
        .unwrap();
        assert_eq!(a.message_ttl, Some(1000));
        assert_eq!(a.expires, Some(60_000));
        assert_eq!(a.max_length, Some(10));
        assert_eq!(a.overflow, Overflow::RejectPublishDlx);
        assert_eq!(a.dead_letter_exchange.unwrap(), "dlx");
        assert_eq!(a.max_priority, Some(10));
        assert_eq!(a.delivery_limit, Some(3));
        assert!(a.single_active_consumer);
    }

    #[test]
    fn invalid_values_have_rabbitmq_wording() {
        // Texts as RabbitMQ 3.10.8 sent them (tests/data/rabbitmq_3_10_queue_args.md).
        let cases: [(&[(&'static str, FieldValue)], &str); 12] = [
            (
                &[("x-message-ttl", FieldValue::I32(-1))],
                "{value_negative,-1}",
            ),
            (
                &[("x-message-ttl", "1000".into())],
                "\"expected integer, got longstr\"",
            ),
            (
                &[("x-message-ttl", FieldValue::F64(1.5))],
                "\"expected integer, got double\"",
            ),
            (
                &[("x-message-ttl", FieldValue::I64(315_360_000_001))],
                "{value_too_large,315360000001}",
            ),
            (&[("x-expires", FieldValue::I32(0))], "{value_zero,0}"),
            (&[("x-overflow", "bogus".into())], "invalid_overflow"),
            (
                &[("x-overflow", FieldValue::I32(1))],
                "{unacceptable_type,signedint}",
            ),
            (
                &[("x-max-priority", FieldValue::I32(256))],
                "{max_value_exceeded,256}",
            ),
            (
                &[("x-single-active-consumer", "yes".into())],
                "{unacceptable_type,longstr}",
            ),
            (
                &[("x-queue-mode", "bogus".into())],
                "\"unsupported queue mode 'bogus'\"",
            ),
            (
                &[("x-queue-type", "bogus".into())],
                "\"unsupported queue type 'bogus'\"",
            ),
            (
                &[("x-dead-letter-routing-key", "k".into())],
                "routing_key_but_no_dlx_defined",
            ),
        ];
        for (args, reason) in cases {
            let e = parse(args).unwrap_err();
            assert_eq!(e.reply_code(), 406);
            assert_eq!(
                e.to_string(),
                format!(
                    "invalid arg '{}' for queue 'q' in vhost '/': {reason}",
                    args[0].0
                )
            );
        }
        let e = parse(&[("x-dead-letter-exchange", FieldValue::I32(1))]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid type 'signedint' for arg 'x-dead-letter-exchange' in queue 'q' in vhost '/'"
        );
        assert!(parse(&[("x-message-ttl", FieldValue::I64(315_360_000_000))]).is_ok());
        assert!(parse(&[("x-max-priority", FieldValue::I32(255))]).is_ok());
        assert!(parse(&[("x-queue-mode", "lazy".into())]).is_ok());
    }

    #[test]
    fn quorum_queues_must_be_durable_shared_and_kept() {
        let a = parse(&[("x-queue-type", "quorum".into())]).unwrap();
        assert!(a.check_properties(true, false, false, "q", "/").is_ok());
        let e = a
            .check_properties(false, false, false, "q", "/")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid property 'non-durable' for queue 'q' in vhost '/'"
        );
        assert!(a.check_properties(true, true, false, "q", "/").is_err());
        assert!(a.check_properties(true, false, true, "q", "/").is_err());
        assert!(
            parse(&[])
                .unwrap()
                .check_properties(false, true, true, "q", "/")
                .is_ok()
        );
    }

    #[test]
    fn equivalence_compares_integers_by_value() {
        let a = table(&[("x-message-ttl", FieldValue::I32(1000))]);
        let b = table(&[("x-message-ttl", FieldValue::I64(1000))]);
        assert_eq!(first_difference(&a, &b), None);
        let c = table(&[("x-message-ttl", FieldValue::I32(2000))]);
        let (arg, received, current) = first_difference(&a, &c).unwrap();
        assert_eq!(arg, "x-message-ttl");
        assert_eq!(received, "the value '2000' of type 'signedint'");
        assert_eq!(current, "the value '1000' of type 'signedint'");
        assert!(first_difference(&a, &FieldTable::new()).is_some());
        // Arguments outside the compared set may differ.
        let d = table(&[
            ("x-message-ttl", FieldValue::I32(1000)),
            ("x-other", "x".into()),
        ]);
        assert_eq!(first_difference(&a, &d), None);
    }

    #[test]
    fn quorum_queues_refuse_what_rabbitmq_refuses_in_its_words() {
        let q = |extra: (&'static str, FieldValue)| {
            parse(&[("x-queue-type", "quorum".into()), extra])
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            q(("x-max-priority", FieldValue::I32(5))),
            "invalid arg 'x-max-priority' for queue 'q' in vhost '/' of queue type rabbit_quorum_queue"
        );
        assert_eq!(
            q(("x-queue-leader-locator", "bogus".into())),
            "invalid arg 'x-queue-leader-locator' for queue 'q' in vhost '/': invalid_queue_locator_arg"
        );
        assert_eq!(
            q(("x-quorum-initial-group-size", FieldValue::I32(0))),
            "invalid arg 'x-quorum-initial-group-size' for queue 'q' in vhost '/': {value_zero,0}"
        );
        assert_eq!(
            q(("x-dead-letter-strategy", "bogus".into())),
            "invalid arg 'x-dead-letter-strategy' for queue 'q' in vhost '/': invalid_dlx_strategy"
        );
        // A negative delivery limit is no limit on a quorum queue, an error
        // on a classic one.
        let a = parse(&[
            ("x-queue-type", "quorum".into()),
            ("x-delivery-limit", FieldValue::I32(-1)),
        ])
        .unwrap();
        assert_eq!(a.delivery_limit, None);
        assert!(parse(&[("x-delivery-limit", FieldValue::I32(-1))]).is_err());
        // Classic queues keep taking what they took.
        assert!(parse(&[("x-max-priority", FieldValue::I32(5))]).is_ok());
    }

    #[test]
    fn a_queue_type_other_than_classic_must_be_named_again() {
        let quorum = table(&[("x-queue-type", "quorum".into())]);
        let classic = table(&[("x-queue-type", "classic".into())]);
        let none = FieldTable::new();
        assert_eq!(
            first_difference(&quorum, &classic),
            Some(("x-queue-type", "'classic'".into(), "'quorum'".into()))
        );
        assert_eq!(
            first_difference(&quorum, &none),
            Some((
                "x-queue-type",
                "none".into(),
                "the value 'quorum' of type 'longstr'".into()
            ))
        );
        assert_eq!(first_difference(&quorum, &quorum), None);
        // Classic is classic, named or not.
        assert_eq!(first_difference(&none, &classic), None);
        assert_eq!(first_difference(&classic, &none), None);
    }
}
