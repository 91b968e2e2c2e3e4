//! The request id: one opaque id per request, echoed back and forwarded to other services.
//!
//! An incoming `x-request-id` is honoured only when it is 1 to 128 bytes of visible ASCII
//! (`0x21..=0x7e`): anything longer, empty, or holding spaces, control characters or non-ASCII
//! bytes is replaced by a new UUID v4, so a client cannot push megabytes, terminal escapes or
//! log-forging newlines through it. Spaces and tabs around the value are not part of it (as
//! around any HTTP field value), whatever the transport: the same id on every hop.

use std::{fmt, str::FromStr, sync::Arc};

use crate::ids;

/// The name of the request id field.
///
/// ```
/// assert_eq!(contextflow_otel::X_REQUEST_ID, "x-request-id");
/// ```
pub const X_REQUEST_ID: &str = "x-request-id";

/// The longest request id accepted, in bytes.
const MAX_LEN: usize = 128;

/// A validated request id: 1 to 128 bytes of visible ASCII. Cheap to clone.
///
/// ```
/// use contextflow_otel::RequestId;
///
/// let id: RequestId = "req-42".parse()?;
/// assert_eq!(id.as_str(), "req-42");
/// assert!("two words".parse::<RequestId>().is_err());
/// assert_eq!(RequestId::new().as_str().len(), 36, "a hyphenated UUID v4");
/// # Ok::<(), contextflow_otel::InvalidRequestId>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RequestId(Arc<str>);

/// Why a request id was rejected.
///
/// The message names the rule that failed, never the rejected value, so it is safe to log.
///
/// ```
/// use contextflow_otel::RequestId;
/// let err = "".parse::<RequestId>().unwrap_err();
/// assert_eq!(err.to_string(), "invalid request id: empty");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidRequestId {
    reason: &'static str,
}

// ===== impl RequestId =====

impl RequestId {
    /// Whether `self` and `other` are the same id value (one allocation), not only equal.
    pub(crate) fn same(&self, other: &RequestId) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// A new random request id: a lower-case hyphenated UUID v4, from a cryptographically
    /// secure generator.
    ///
    /// ```
    /// use contextflow_otel::RequestId;
    /// let id = RequestId::new();
    /// assert_eq!(id.as_str().len(), 36);
    /// assert_eq!(&id.as_str()[14..15], "4", "version 4");
    /// assert_ne!(id, RequestId::new());
    /// ```
    #[allow(clippy::new_without_default)] // a `Default` that is random each time would surprise
    pub fn new() -> Self {
        let mut bytes = ids::random_bytes();
        bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
        bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 9562 variant
        let mut digits = [0u8; 32];
        for (out, word) in digits.chunks_exact_mut(8).zip(bytes.chunks_exact(4)) {
            out.copy_from_slice(&hex_word(word.try_into().unwrap_or_default()));
        }
        // `8-4-4-4-12`.
        let mut text = [b'-'; 36];
        text[..8].copy_from_slice(&digits[..8]);
        text[9..13].copy_from_slice(&digits[8..12]);
        text[14..18].copy_from_slice(&digits[12..16]);
        text[19..23].copy_from_slice(&digits[16..20]);
        text[24..].copy_from_slice(&digits[20..]);
        RequestId(std::str::from_utf8(&text).unwrap_or("-").into())
    }

    /// Checks a value given as bytes: 1 to 128 bytes, each visible ASCII (`0x21..=0x7e`),
    /// once the spaces and tabs around it are left out (HTTP's optional whitespace, which
    /// an HTTP parser drops and other transports keep).
    ///
    /// # Errors
    ///
    /// When the value is empty, too long, or holds any other byte.
    ///
    /// ```
    /// use contextflow_otel::RequestId;
    /// assert!(RequestId::parse_bytes(b"abc").is_ok());
    /// assert_eq!(RequestId::parse_bytes(b" abc\t")?.as_str(), "abc");
    /// assert!(RequestId::parse_bytes(b"caf\xc3\xa9").is_err());
    /// # Ok::<(), contextflow_otel::InvalidRequestId>(())
    /// ```
    pub fn parse_bytes(value: &[u8]) -> Result<Self, InvalidRequestId> {
        let ows = |b: &u8| *b == b' ' || *b == b'\t';
        let start = value.iter().position(|b| !ows(b)).unwrap_or(value.len());
        let end = value.iter().rposition(|b| !ows(b)).map_or(start, |i| i + 1);
        let value = &value[start..end];
        validate(value)?;
        // Validated as visible ASCII, so the lossy conversion never replaces anything.
        Ok(RequestId(String::from_utf8_lossy(value).into()))
    }

    /// The id as text.
    ///
    /// ```
    /// use contextflow_otel::RequestId;
    /// assert_eq!("abc".parse::<RequestId>()?.as_str(), "abc");
    /// # Ok::<(), contextflow_otel::InvalidRequestId>(())
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RequestId {
    type Err = InvalidRequestId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RequestId::parse_bytes(s.as_bytes())
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", self.as_str())
    }
}

// ===== impl InvalidRequestId =====

impl InvalidRequestId {
    pub(crate) const fn new(reason: &'static str) -> Self {
        InvalidRequestId { reason }
    }
}

impl fmt::Display for InvalidRequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid request id: {}", self.reason)
    }
}

impl std::error::Error for InvalidRequestId {}

/// The sixteen lower-case hex digits of four bytes, computed a word at a time (no table
/// lookup per digit).
fn hex_word(bytes: [u8; 4]) -> [u8; 8] {
    const NIBBLES: u64 = 0x000f_000f_000f_000f;
    const ONES: u64 = 0x0101_0101_0101_0101;
    // Byte `i` of the input goes to byte `2 * i`: its high nibble there, its low nibble in
    // byte `2 * i + 1` (little-endian, so in text order).
    let x = u64::from(u32::from_le_bytes(bytes));
    let x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
    let x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
    let values = ((x >> 4) & NIBBLES) | ((x & NIBBLES) << 8);
    // A value of 10 or more (bit 4 of value + 6) becomes a letter: 'a' is '0' + 10 + 39.
    let letters = ((values + ONES * 6) >> 4) & ONES;
    (values + ONES * u64::from(b'0') + letters * 39).to_le_bytes()
}

fn validate(bytes: &[u8]) -> Result<(), InvalidRequestId> {
    if bytes.is_empty() {
        Err(InvalidRequestId::new("empty"))
    } else if bytes.len() > MAX_LEN {
        Err(InvalidRequestId::new("longer than 128 bytes"))
    } else if !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        Err(InvalidRequestId::new("not visible ASCII"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The word-at-a-time digits are those of `{:02x}`, byte by byte.
        #[test]
        fn hex_word_matches_format(bytes in any::<[u8; 4]>()) {
            let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            prop_assert_eq!(&hex_word(bytes)[..], expected.as_bytes());
        }
    }

    #[test]
    fn hex_word_edges() {
        assert_eq!(&hex_word([0x00, 0x09, 0x0a, 0xff]), b"00090aff");
        assert_eq!(&hex_word([0x90, 0xa0, 0xf9, 0x5c]), b"90a0f95c");
    }

    #[test]
    fn fresh_ids_are_uuid_v4_text() {
        for _ in 0..1_000 {
            let id = RequestId::new();
            let text = id.as_str().as_bytes();
            assert_eq!(text.len(), 36);
            for (i, &c) in text.iter().enumerate() {
                if [8, 13, 18, 23].contains(&i) {
                    assert_eq!(c, b'-', "{id}");
                } else {
                    assert!(c.is_ascii_hexdigit() && !c.is_ascii_uppercase(), "{id}");
                }
            }
            assert_eq!(text[14], b'4', "version: {id}");
            assert!(
                matches!(text[19], b'8' | b'9' | b'a' | b'b'),
                "variant: {id}"
            );
        }
    }
}
