//! Durable definitions: what they are and how they are keyed.
//!
//! Each definition is stored as an AMQP field table (the codec encodes and
//! validates it, and the server already speaks that type), keyed by a kind
//! octet and a name. Names of objects inside a vhost are `vhost ‖ 0x00 ‖ name`
//! ([`scoped_name`]); a `0x00` cannot occur in AMQP short strings' UTF-8 names
//! as clients send them, so the split is unambiguous.

use bytes::{BufMut, Bytes, BytesMut};

/// What a definition defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum DefKind {
    /// A virtual host.
    Vhost = 1,
    /// A user.
    User = 2,
    /// A user's permissions in a vhost.
    Permission = 3,
    /// A durable exchange.
    Exchange = 4,
    /// A durable queue.
    Queue = 5,
    /// A binding between durable objects.
    Binding = 6,
    /// A policy.
    Policy = 7,
    /// A user's topic permissions on one exchange in a vhost.
    TopicPermission = 8,
    /// An operator policy (RabbitMQ's `set_operator_policy`).
    OperatorPolicy = 9,
}

impl DefKind {
    /// The kind stored as `octet`.
    pub fn from_octet(octet: u8) -> Option<DefKind> {
        Some(match octet {
            1 => DefKind::Vhost,
            2 => DefKind::User,
            3 => DefKind::Permission,
            4 => DefKind::Exchange,
            5 => DefKind::Queue,
            6 => DefKind::Binding,
            7 => DefKind::Policy,
            8 => DefKind::TopicPermission,
            9 => DefKind::OperatorPolicy,
            _ => return None,
        })
    }
}

/// The key of an object inside a vhost: `vhost ‖ 0x00 ‖ parts joined by 0x00`.
pub fn scoped_name(vhost: &str, parts: &[&[u8]]) -> Bytes {
    let mut b =
        BytesMut::with_capacity(vhost.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    b.put_slice(vhost.as_bytes());
    for p in parts {
        b.put_u8(0);
        b.put_slice(p);
    }
    b.freeze()
}
