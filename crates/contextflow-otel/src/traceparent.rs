//! W3C Trace Context: the `traceparent` value.
//!
//! A `traceparent` looks like `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`:
//! version, trace id, parent (span) id and flags, in lower-case hex. Parsing follows the
//! [W3C Trace Context](https://www.w3.org/TR/trace-context-2/) rules, Level 2 included:
//!
//! - version `ff` is invalid; version `00` is exactly 55 characters; a higher (future) version
//!   is parsed leniently: its first 55 characters, when they are followed by `-` or the end;
//! - only lower-case hex digits; an all-zero trace id or parent id is invalid;
//! - flags: bit 0 is *sampled*, bit 1 is Level 2's *random trace id*; other bits are kept
//!   when parsing and cleared when propagating, as the spec asks;
//! - more than one `traceparent` value makes the trace context invalid (checked by the
//!   propagator, which sees every value).
//!
//! The ids and flags are OpenTelemetry's own types, so a parsed value becomes a remote
//! [`SpanContext`] with no conversion.

use std::{fmt, str::FromStr};

use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

/// The name of the `traceparent` field.
///
/// ```
/// assert_eq!(contextflow_otel::TRACEPARENT, "traceparent");
/// ```
pub const TRACEPARENT: &str = "traceparent";

/// Level 2's *random trace id* flag (bit 1).
///
/// ```
/// use opentelemetry::trace::TraceFlags;
/// assert_eq!(contextflow_otel::RANDOM_TRACE_ID, TraceFlags::new(0x02));
/// ```
pub const RANDOM_TRACE_ID: TraceFlags = TraceFlags::new(0x02);

/// The flag bits this version of the spec defines (*sampled* and *random*): the only ones
/// propagated.
const KNOWN_FLAGS: u8 = 0x03;

/// The length of a version `00` `traceparent` value.
const TRACEPARENT_LEN: usize = 55;

/// A parsed `traceparent`: the caller's trace id, its span id and its flags.
///
/// ```
/// use contextflow_otel::TraceParent;
///
/// let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
/// assert_eq!(tp.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_eq!(tp.parent_id().to_string(), "00f067aa0ba902b7");
/// assert!(tp.flags().is_sampled());
/// assert_eq!(tp.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
///
/// // A future version is read leniently and written back as version 00.
/// let future: TraceParent =
///     "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next".parse()?;
/// assert_eq!(future, tp);
/// # Ok::<(), contextflow_otel::InvalidTraceParent>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: TraceId,
    parent_id: SpanId,
    flags: TraceFlags,
}

/// Why a `traceparent` was rejected.
///
/// The message names the rule that failed, never the rejected value, so it is safe to log.
///
/// ```
/// use contextflow_otel::TraceParent;
///
/// let err = "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
///     .parse::<TraceParent>()
///     .unwrap_err();
/// assert_eq!(err.to_string(), "invalid traceparent: version ff is invalid");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidTraceParent {
    reason: &'static str,
}

// ===== impl TraceParent =====

impl TraceParent {
    /// A `traceparent` from its parts.
    ///
    /// # Errors
    ///
    /// When the trace id or the parent id is all zero.
    ///
    /// ```
    /// use contextflow_otel::TraceParent;
    /// use opentelemetry::trace::{SpanId, TraceFlags, TraceId};
    /// let tp = TraceParent::new(TraceId::from(1u128), SpanId::from(2u64), TraceFlags::SAMPLED)?;
    /// assert_eq!(tp.to_string(), "00-00000000000000000000000000000001-0000000000000002-01");
    /// assert!(TraceParent::new(TraceId::INVALID, SpanId::from(2u64), TraceFlags::SAMPLED).is_err());
    /// # Ok::<(), contextflow_otel::InvalidTraceParent>(())
    /// ```
    pub fn new(
        trace_id: TraceId,
        parent_id: SpanId,
        flags: TraceFlags,
    ) -> Result<Self, InvalidTraceParent> {
        if trace_id == TraceId::INVALID {
            return Err(InvalidTraceParent::new("trace id is all zero"));
        }
        if parent_id == SpanId::INVALID {
            return Err(InvalidTraceParent::new("parent id is all zero"));
        }
        Ok(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The `traceparent` of a span context, or `None` when it is not valid.
    ///
    /// ```
    /// use contextflow_otel::TraceParent;
    /// use opentelemetry::trace::SpanContext;
    /// assert!(TraceParent::from_span_context(&SpanContext::empty_context()).is_none());
    /// ```
    pub fn from_span_context(sc: &SpanContext) -> Option<Self> {
        TraceParent::new(sc.trace_id(), sc.span_id(), sc.trace_flags()).ok()
    }

    /// Parses one `traceparent` value given as bytes (a header value need not be UTF-8).
    /// Optional white space (spaces, tabs) around the value is ignored.
    ///
    /// # Errors
    ///
    /// When the value breaks a rule of the spec (see the [module docs](self)).
    ///
    /// ```
    /// use contextflow_otel::TraceParent;
    /// assert!(TraceParent::parse_bytes(b" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_ok());
    /// assert!(TraceParent::parse_bytes(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-").is_err());
    /// ```
    pub fn parse_bytes(value: &[u8]) -> Result<Self, InvalidTraceParent> {
        let v = trim_ows(value);
        if v.len() < TRACEPARENT_LEN {
            return Err(InvalidTraceParent::new("shorter than 55 characters"));
        }
        let version = decode_hex::<1>(&v[..2]).ok_or(InvalidTraceParent::new(
            "version is not 2 lower-case hex digits",
        ))?[0];
        if version == 0xff {
            return Err(InvalidTraceParent::new("version ff is invalid"));
        }
        if version == 0 && v.len() != TRACEPARENT_LEN {
            return Err(InvalidTraceParent::new(
                "version 00 must be exactly 55 characters",
            ));
        }
        if v.len() > TRACEPARENT_LEN && v[TRACEPARENT_LEN] != b'-' {
            return Err(InvalidTraceParent::new(
                "future version: flags not followed by '-' or the end",
            ));
        }
        if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return Err(InvalidTraceParent::new("fields not separated by '-'"));
        }
        let trace_id = decode_hex::<16>(&v[3..35]).ok_or(InvalidTraceParent::new(
            "trace id is not 32 lower-case hex digits",
        ))?;
        let parent_id = decode_hex::<8>(&v[36..52]).ok_or(InvalidTraceParent::new(
            "parent id is not 16 lower-case hex digits",
        ))?;
        let flags = decode_hex::<1>(&v[53..55]).ok_or(InvalidTraceParent::new(
            "flags are not 2 lower-case hex digits",
        ))?[0];
        TraceParent::new(
            TraceId::from_bytes(trace_id),
            SpanId::from_bytes(parent_id),
            TraceFlags::new(flags),
        )
    }

    /// The trace id.
    ///
    /// ```
    /// use contextflow_otel::TraceParent;
    /// let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
    /// assert_eq!(tp.trace_id(), opentelemetry::trace::TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736));
    /// # Ok::<(), contextflow_otel::InvalidTraceParent>(())
    /// ```
    pub const fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// The span id of the caller (the spec's `parent-id`).
    ///
    /// ```
    /// use contextflow_otel::TraceParent;
    /// let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
    /// assert_eq!(tp.parent_id(), opentelemetry::trace::SpanId::from(0x00f067aa0ba902b7));
    /// # Ok::<(), contextflow_otel::InvalidTraceParent>(())
    /// ```
    pub const fn parent_id(&self) -> SpanId {
        self.parent_id
    }

    /// The flags, as received (unknown bits included).
    ///
    /// ```
    /// use contextflow_otel::TraceParent;
    /// let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff".parse()?;
    /// assert_eq!(tp.flags().to_u8(), 0xff);
    /// # Ok::<(), contextflow_otel::InvalidTraceParent>(())
    /// ```
    pub const fn flags(&self) -> TraceFlags {
        self.flags
    }

    /// The caller's span as a remote [`SpanContext`] with `trace_state`; only the flags this
    /// version of the spec defines are kept.
    ///
    /// ```
    /// use contextflow_otel::TraceParent;
    /// use opentelemetry::trace::TraceState;
    /// let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff".parse()?;
    /// let sc = tp.to_remote_span_context(TraceState::default());
    /// assert!(sc.is_remote() && sc.is_valid());
    /// assert_eq!(sc.trace_flags().to_u8(), 0x03, "unknown bits are cleared");
    /// # Ok::<(), contextflow_otel::InvalidTraceParent>(())
    /// ```
    pub fn to_remote_span_context(&self, trace_state: TraceState) -> SpanContext {
        SpanContext::new(
            self.trace_id,
            self.parent_id,
            TraceFlags::new(self.flags.to_u8() & KNOWN_FLAGS),
            true,
            trace_state,
        )
    }

    /// The value as text, always version `00`, with the known flags only (what a service
    /// propagates).
    ///
    /// ```
    /// use contextflow_otel::TraceParent;
    /// let tp: TraceParent = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-x".parse()?;
    /// assert_eq!(tp.to_propagated(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    /// # Ok::<(), contextflow_otel::InvalidTraceParent>(())
    /// ```
    pub fn to_propagated(&self) -> String {
        format_traceparent(
            self.trace_id,
            self.parent_id,
            self.flags.to_u8() & KNOWN_FLAGS,
        )
    }
}

impl FromStr for TraceParent {
    type Err = InvalidTraceParent;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TraceParent::parse_bytes(s.as_bytes())
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_traceparent(
            self.trace_id,
            self.parent_id,
            self.flags.to_u8(),
        ))
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

// ===== impl InvalidTraceParent =====

impl InvalidTraceParent {
    pub(crate) const fn new(reason: &'static str) -> Self {
        InvalidTraceParent { reason }
    }
}

impl fmt::Display for InvalidTraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid traceparent: {}", self.reason)
    }
}

impl std::error::Error for InvalidTraceParent {}

// ===== helpers =====

/// `00-{trace id}-{span id}-{flags}` in lower-case hex, built without `fmt`.
pub(crate) fn format_traceparent(trace_id: TraceId, span_id: SpanId, flags: u8) -> String {
    let mut buf = [0u8; TRACEPARENT_LEN];
    buf[..3].copy_from_slice(b"00-");
    encode_hex(&mut buf[3..35], &trace_id.to_bytes());
    buf[35] = b'-';
    encode_hex(&mut buf[36..52], &span_id.to_bytes());
    buf[52] = b'-';
    encode_hex(&mut buf[53..55], &[flags]);
    // Hex digits and dashes are ASCII, so every byte maps to one char.
    buf.iter().map(|&b| char::from(b)).collect()
}

/// Strips the optional white space (spaces and horizontal tabs) HTTP allows around a value.
pub(crate) fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Decodes exactly `2 * N` lower-case hex digits.
fn decode_hex<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
    if hex.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    if N.is_multiple_of(4) {
        // The trace id and the parent id: eight digits at a time.
        for (bytes, digits) in out.chunks_exact_mut(4).zip(hex.chunks_exact(8)) {
            bytes.copy_from_slice(&decode_hex_word(digits.try_into().ok()?)?);
        }
        return Some(out);
    }
    decode_hex_bytes(hex, &mut out).then_some(out)
}

/// Decodes `hex` (twice as long as `out`) digit by digit; `false` if any byte is not a
/// lower-case hex digit.
fn decode_hex_bytes(hex: &[u8], out: &mut [u8]) -> bool {
    // No branch per digit: a digit's value is below 16 and a non-digit's is 0xff, so one
    // check of the high bits of all the values OR-ed together finds any non-digit.
    let mut seen = 0u8;
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (high, low) = (
            HEX_VALUE[usize::from(pair[0])],
            HEX_VALUE[usize::from(pair[1])],
        );
        seen |= high | low;
        *byte = (high << 4) | low;
    }
    seen < 16
}

/// Decodes eight lower-case hex digits into four bytes with word arithmetic (about a fifth of
/// the instructions of the table lookups), or `None` if any byte is not such a digit.
fn decode_hex_word(digits: [u8; 8]) -> Option<[u8; 4]> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    let x = u64::from_le_bytes(digits);
    if x & HIGH != 0 {
        return None;
    }
    // For a byte b below 0x80, b + (0x80 - c) stays within its byte, and its high bit is set
    // exactly when b >= c.
    let at_least = |c: u8| x + ONES * u64::from(0x80 - c);
    let digit = at_least(b'0') & !at_least(b'9' + 1);
    let letter = at_least(b'a') & !at_least(b'f' + 1);
    if (digit | letter) & HIGH != HIGH {
        return None;
    }
    // '0'..='9' are 0x30..=0x39 and 'a'..='f' 0x61..=0x66: the low nibble, plus 9 for a letter.
    let values = (x & (ONES * 0x0f)) + ((letter & HIGH) >> 7) * 9;
    // Byte i holds digit i (below 16): pair them as (d0 << 4 | d1), (d2 << 4 | d3), ... in the
    // even bytes, then gather the even bytes.
    let pairs = ((values << 4) | (values >> 8)) & 0x00ff_00ff_00ff_00ff;
    let pairs = (pairs | (pairs >> 8)) & 0x0000_ffff_0000_ffff;
    let packed = (pairs | (pairs >> 16)) & 0xffff_ffff;
    Some((packed as u32).to_le_bytes())
}

/// The value of each lower-case hex digit; 0xff marks a byte that is not one.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

const HEX: &[u8; 16] = b"0123456789abcdef";

fn encode_hex(out: &mut [u8], bytes: &[u8]) {
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0x0f)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word decoder against the digit-by-digit one.
    fn same_as_bytes(digits: [u8; 8]) {
        let mut out = [0u8; 4];
        let expected = decode_hex_bytes(&digits, &mut out).then_some(out);
        assert_eq!(decode_hex_word(digits), expected, "{:?}", digits);
    }

    #[test]
    fn word_decoder_agrees_for_every_byte_at_every_position() {
        for base in [
            *b"00000000",
            *b"0123abcd",
            *b"ffffffff",
            *b"9a9a9a9a",
            *b"deadbeef",
        ] {
            for at in 0..8 {
                for byte in 0..=255u8 {
                    let mut digits = base;
                    digits[at] = byte;
                    same_as_bytes(digits);
                }
            }
        }
    }

    #[test]
    fn word_decoder_agrees_on_random_words() {
        use proptest::prelude::*;
        // Bytes drawn mostly from around the digit ranges' edges, where a carry or a compare
        // would go wrong first.
        let near = prop_oneof![
            Just(b'0'),
            Just(b'9'),
            Just(b'a'),
            Just(b'f'),
            Just(b'/'),
            Just(b':'),
            Just(b'`'),
            Just(b'g'),
            Just(b'A'),
            Just(b'F'),
            0x7fu8..=0x80,
            any::<u8>(),
        ];
        proptest!(ProptestConfig::with_cases(20_000), |(digits in proptest::array::uniform8(near))| {
            same_as_bytes(digits);
        });
    }
}
