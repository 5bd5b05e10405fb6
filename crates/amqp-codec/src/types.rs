//! [`ShortStr`]: the AMQP `shortstr`, a zero-copy UTF-8 string of at most 255 octets.
//!
//! Names of exchanges, queues, routing keys, consumer tags and most properties
//! are short strings. Decoding one slices the frame's `Bytes` (no copy, no
//! allocation) after checking it is UTF-8, so the rest of the broker can treat
//! it as `&str`. The 255-octet limit is an invariant of the type: a longer string
//! cannot be built, so it can never be silently truncated on encode.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use bytes::Bytes;

use crate::error::CodecError;

/// An AMQP short string: valid UTF-8, at most [`ShortStr::MAX_LEN`] octets, backed by `Bytes`.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ShortStr(Bytes);

impl ShortStr {
    /// The longest short string the wire format can carry.
    pub const MAX_LEN: usize = 255;

    /// Wraps a string literal.
    ///
    /// # Panics
    /// If `s` is longer than 255 octets; meant for literals, where that is a
    /// programming error caught by the first test that runs the line.
    #[allow(clippy::panic)]
    pub const fn from_static(s: &'static str) -> Self {
        if s.len() > Self::MAX_LEN {
            panic!("ShortStr::from_static: longer than 255 octets");
        }
        ShortStr(Bytes::from_static(s.as_bytes()))
    }

    /// Builds a short string from octets, checking length and UTF-8.
    pub fn from_bytes(bytes: Bytes) -> Result<Self, CodecError> {
        if bytes.len() > Self::MAX_LEN {
            return Err(CodecError::too_long("short string", bytes.len(), 255));
        }
        if std::str::from_utf8(&bytes).is_err() {
            return Err(CodecError::MalformedMethod {
                method: "short string",
                ids: (0, 0),
                reason: crate::error::Malformed::InvalidUtf8,
            });
        }
        Ok(ShortStr(bytes))
    }

    /// Wraps octets already known to be UTF-8 and at most 255 long.
    pub(crate) fn from_checked(bytes: Bytes) -> Self {
        debug_assert!(bytes.len() <= Self::MAX_LEN && std::str::from_utf8(&bytes).is_ok());
        ShortStr(bytes)
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor checks UTF-8 (`from_bytes`, the decoder via
        // `from_checked`) or starts from a `str` (`from_static`, `TryFrom`).
        #[allow(unsafe_code)]
        unsafe {
            std::str::from_utf8_unchecked(&self.0)
        }
    }

    /// The octets as they go on the wire (without the length prefix).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The backing buffer (cheap to clone).
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl Deref for ShortStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for ShortStr {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for ShortStr {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

// Hash as `str` does, so `Borrow<str>` lookups in hash maps work.
impl Hash for ShortStr {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialEq<str> for ShortStr {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ShortStr {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for ShortStr {
    type Error = CodecError;
    fn try_from(s: String) -> Result<Self, CodecError> {
        if s.len() > Self::MAX_LEN {
            return Err(CodecError::too_long("short string", s.len(), 255));
        }
        Ok(ShortStr(Bytes::from(s)))
    }
}

impl TryFrom<&str> for ShortStr {
    type Error = CodecError;
    fn try_from(s: &str) -> Result<Self, CodecError> {
        if s.len() > Self::MAX_LEN {
            return Err(CodecError::too_long("short string", s.len(), 255));
        }
        Ok(ShortStr(Bytes::copy_from_slice(s.as_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longer_than_255_octets_is_an_error_not_a_truncation() {
        let s = "x".repeat(256);
        assert!(matches!(
            ShortStr::try_from(s.as_str()),
            Err(CodecError::TooLong { len: 256, .. })
        ));
        assert!(ShortStr::try_from("y".repeat(255)).is_ok());
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        assert!(ShortStr::from_bytes(Bytes::from_static(b"\xff\xfe")).is_err());
        assert_eq!(
            ShortStr::from_bytes(Bytes::from_static(b"ok")).unwrap(),
            "ok"
        );
    }

    #[test]
    fn hashes_like_str() {
        let mut set = std::collections::HashSet::new();
        set.insert(ShortStr::from_static("q1"));
        assert!(set.contains("q1"));
    }
}
