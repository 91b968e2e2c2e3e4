//! W3C Trace Context: the `traceparent` header and the [`TraceContext`] of a request.
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
//! - more than one `traceparent` header makes the request's trace context invalid.
//!
//! A service that receives an invalid `traceparent` starts a new trace and drops `tracestate`.

use std::{fmt, ops::BitOr, str::FromStr};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::{rand, TraceState};

/// The name of the `traceparent` header.
///
/// ```
/// assert_eq!(contextflow_http::TRACEPARENT, "traceparent");
/// ```
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The length of a version `00` `traceparent` value.
const TRACEPARENT_LEN: usize = 55;

/// A 16-byte trace id, shared by every span of one trace; never all zero.
///
/// ```
/// use contextflow_http::TraceId;
///
/// let id: TraceId = "4bf92f3577b34da6a3ce929d0e0e4736".parse()?;
/// assert_eq!(id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert!("00000000000000000000000000000000".parse::<TraceId>().is_err());
/// assert!("4BF92F3577B34DA6A3CE929D0E0E4736".parse::<TraceId>().is_err());
/// # Ok::<(), contextflow_http::InvalidTraceParent>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceId([u8; 16]);

/// An 8-byte span id (the `parent-id` of a `traceparent`); never all zero.
///
/// ```
/// use contextflow_http::SpanId;
///
/// let id: SpanId = "00f067aa0ba902b7".parse()?;
/// assert_eq!(id.to_bytes(), [0, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
/// assert_ne!(SpanId::random(), SpanId::random());
/// # Ok::<(), contextflow_http::InvalidTraceParent>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanId([u8; 8]);

/// The `trace-flags` byte of a `traceparent`.
///
/// ```
/// use contextflow_http::TraceFlags;
///
/// let flags = TraceFlags::SAMPLED | TraceFlags::RANDOM;
/// assert!(flags.is_sampled() && flags.is_random());
/// assert_eq!(flags.bits(), 0x03);
/// assert_eq!(TraceFlags::from_bits(0xff).known(), flags);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TraceFlags(u8);

/// A parsed `traceparent` header: the caller's trace id, its span id and its flags.
///
/// ```
/// use contextflow_http::TraceParent;
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
/// # Ok::<(), contextflow_http::InvalidTraceParent>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: TraceId,
    parent_id: SpanId,
    flags: TraceFlags,
}

/// The trace context of the current unit of work (one request handled by this service).
///
/// It holds this service's own span id, made when the request came in, the caller's span id
/// (`parent_span_id`), the flags and the vendors' `tracestate`. Outgoing calls carry the trace
/// id with a new span id each (see [`TraceContext::child_traceparent`]).
///
/// ```
/// use contextflow_http::{TraceContext, TraceParent, TraceState};
///
/// let incoming: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
/// let ctx = TraceContext::child_of(&incoming, TraceState::new());
/// assert_eq!(ctx.trace_id(), incoming.trace_id());
/// assert_eq!(ctx.parent_span_id(), Some(incoming.parent_id()));
/// assert_ne!(ctx.span_id(), incoming.parent_id());
///
/// let outgoing = ctx.child_traceparent();
/// assert_eq!(outgoing.trace_id(), ctx.trace_id());
/// assert_ne!(outgoing.parent_id(), ctx.span_id());
/// # Ok::<(), contextflow_http::InvalidTraceParent>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: TraceId,
    span_id: SpanId,
    flags: TraceFlags,
    parent_span_id: Option<SpanId>,
    trace_state: TraceState,
}

/// Why a `traceparent` (or a trace id or span id) was rejected.
///
/// The message names the rule that failed, never the rejected value, so it is safe to log.
///
/// ```
/// use contextflow_http::TraceParent;
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

// ===== impl TraceId =====

impl TraceId {
    /// A random trace id (never all zero), as Level 2's *random trace id* flag requires.
    ///
    /// ```
    /// use contextflow_http::TraceId;
    /// assert_ne!(TraceId::random(), TraceId::random());
    /// ```
    pub fn random() -> Self {
        let hi = rand::next_u64();
        let lo = rand::non_zero_u64();
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&hi.to_be_bytes());
        bytes[8..].copy_from_slice(&lo.to_be_bytes());
        TraceId(bytes)
    }

    /// The id made of `bytes`, or `None` when they are all zero.
    ///
    /// ```
    /// use contextflow_http::TraceId;
    /// assert!(TraceId::from_bytes([0; 16]).is_none());
    /// assert_eq!(TraceId::from_bytes([1; 16]).unwrap().to_bytes(), [1; 16]);
    /// ```
    pub fn from_bytes(bytes: [u8; 16]) -> Option<Self> {
        (bytes != [0; 16]).then_some(TraceId(bytes))
    }

    /// The id's 16 bytes.
    ///
    /// ```
    /// use contextflow_http::TraceId;
    /// let id = TraceId::random();
    /// assert_eq!(TraceId::from_bytes(id.to_bytes()), Some(id));
    /// ```
    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }
}

impl FromStr for TraceId {
    type Err = InvalidTraceParent;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = decode_hex::<16>(s.as_bytes()).ok_or(InvalidTraceParent::new(
            "trace id is not 32 lower-case hex digits",
        ))?;
        TraceId::from_bytes(bytes).ok_or(InvalidTraceParent::new("trace id is all zero"))
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

// ===== impl SpanId =====

impl SpanId {
    /// A random span id (never all zero).
    ///
    /// ```
    /// use contextflow_http::SpanId;
    /// assert_ne!(SpanId::random().to_bytes(), [0; 8]);
    /// ```
    pub fn random() -> Self {
        SpanId(rand::non_zero_u64().to_be_bytes())
    }

    /// The id made of `bytes`, or `None` when they are all zero.
    ///
    /// ```
    /// use contextflow_http::SpanId;
    /// assert!(SpanId::from_bytes([0; 8]).is_none());
    /// assert!(SpanId::from_bytes([0, 0, 0, 0, 0, 0, 0, 1]).is_some());
    /// ```
    pub fn from_bytes(bytes: [u8; 8]) -> Option<Self> {
        (bytes != [0; 8]).then_some(SpanId(bytes))
    }

    /// The id's 8 bytes.
    ///
    /// ```
    /// use contextflow_http::SpanId;
    /// let id = SpanId::random();
    /// assert_eq!(SpanId::from_bytes(id.to_bytes()), Some(id));
    /// ```
    pub fn to_bytes(self) -> [u8; 8] {
        self.0
    }
}

impl FromStr for SpanId {
    type Err = InvalidTraceParent;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = decode_hex::<8>(s.as_bytes()).ok_or(InvalidTraceParent::new(
            "parent id is not 16 lower-case hex digits",
        ))?;
        SpanId::from_bytes(bytes).ok_or(InvalidTraceParent::new("parent id is all zero"))
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpanId({self})")
    }
}

// ===== impl TraceFlags =====

impl TraceFlags {
    /// No flag set.
    ///
    /// ```
    /// use contextflow_http::TraceFlags;
    /// assert!(!TraceFlags::NONE.is_sampled());
    /// ```
    pub const NONE: TraceFlags = TraceFlags(0);

    /// Bit 0: the caller may have recorded its span.
    ///
    /// ```
    /// use contextflow_http::TraceFlags;
    /// assert!(TraceFlags::SAMPLED.is_sampled());
    /// ```
    pub const SAMPLED: TraceFlags = TraceFlags(0x01);

    /// Bit 1 (Level 2): the trace id's right-most 7 bytes are random.
    ///
    /// ```
    /// use contextflow_http::TraceFlags;
    /// assert!(TraceFlags::RANDOM.is_random());
    /// ```
    pub const RANDOM: TraceFlags = TraceFlags(0x02);

    /// Flags from their byte, unknown bits included.
    ///
    /// ```
    /// use contextflow_http::TraceFlags;
    /// assert_eq!(TraceFlags::from_bits(0x09).bits(), 0x09);
    /// ```
    pub const fn from_bits(bits: u8) -> Self {
        TraceFlags(bits)
    }

    /// The flags' byte.
    ///
    /// ```
    /// use contextflow_http::TraceFlags;
    /// assert_eq!(TraceFlags::SAMPLED.bits(), 1);
    /// ```
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether bit 0 (*sampled*) is set.
    ///
    /// ```
    /// use contextflow_http::TraceFlags;
    /// assert!(TraceFlags::from_bits(0x03).is_sampled());
    /// ```
    pub const fn is_sampled(self) -> bool {
        self.0 & 0x01 != 0
    }

    /// Whether bit 1 (*random trace id*) is set.
    ///
    /// ```
    /// use contextflow_http::TraceFlags;
    /// assert!(!TraceFlags::from_bits(0x01).is_random());
    /// ```
    pub const fn is_random(self) -> bool {
        self.0 & 0x02 != 0
    }

    /// These flags with *sampled* set to `sampled`.
    ///
    /// ```
    /// use contextflow_http::TraceFlags;
    /// assert_eq!(TraceFlags::RANDOM.with_sampled(true).bits(), 0x03);
    /// ```
    pub const fn with_sampled(self, sampled: bool) -> Self {
        if sampled {
            TraceFlags(self.0 | 0x01)
        } else {
            TraceFlags(self.0 & !0x01)
        }
    }

    /// Only the flags this version of the spec defines (*sampled* and *random*): what a
    /// service propagates, since the spec asks for unknown bits to be cleared.
    ///
    /// ```
    /// use contextflow_http::TraceFlags;
    /// assert_eq!(TraceFlags::from_bits(0x05).known(), TraceFlags::SAMPLED);
    /// ```
    pub const fn known(self) -> Self {
        TraceFlags(self.0 & 0x03)
    }
}

impl BitOr for TraceFlags {
    type Output = TraceFlags;

    fn bitor(self, rhs: TraceFlags) -> TraceFlags {
        TraceFlags(self.0 | rhs.0)
    }
}

impl fmt::Display for TraceFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &[self.0])
    }
}

impl fmt::Debug for TraceFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceFlags({self})")
    }
}

// ===== impl TraceParent =====

impl TraceParent {
    /// A `traceparent` from its parts.
    ///
    /// ```
    /// use contextflow_http::{SpanId, TraceFlags, TraceId, TraceParent};
    /// let tp = TraceParent::new(TraceId::random(), SpanId::random(), TraceFlags::SAMPLED);
    /// assert_eq!(tp.to_string().len(), 55);
    /// ```
    pub const fn new(trace_id: TraceId, parent_id: SpanId, flags: TraceFlags) -> Self {
        TraceParent {
            trace_id,
            parent_id,
            flags,
        }
    }

    /// Parses one `traceparent` value given as bytes (a header value need not be UTF-8).
    /// Optional white space (spaces, tabs) around the value is ignored.
    ///
    /// # Errors
    ///
    /// When the value breaks a rule of the spec (see the [module docs](self)).
    ///
    /// ```
    /// use contextflow_http::TraceParent;
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
        Ok(TraceParent {
            trace_id: TraceId::from_bytes(trace_id)
                .ok_or(InvalidTraceParent::new("trace id is all zero"))?,
            parent_id: SpanId::from_bytes(parent_id)
                .ok_or(InvalidTraceParent::new("parent id is all zero"))?,
            flags: TraceFlags(flags),
        })
    }

    /// Reads the `traceparent` of a request: `Ok(None)` when there is none.
    ///
    /// # Errors
    ///
    /// When the only `traceparent` header is invalid, or when there is more than one.
    ///
    /// ```
    /// use contextflow_http::TraceParent;
    /// use http::HeaderMap;
    ///
    /// let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    /// let mut headers = HeaderMap::new();
    /// assert_eq!(TraceParent::from_headers(&headers), Ok(None));
    /// headers.append("traceparent", tp.parse()?);
    /// assert!(TraceParent::from_headers(&headers)?.is_some());
    /// headers.append("traceparent", tp.parse()?);
    /// assert!(TraceParent::from_headers(&headers).is_err(), "duplicate headers are invalid");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, InvalidTraceParent> {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(InvalidTraceParent::new("more than one traceparent header"));
        }
        TraceParent::parse_bytes(first.as_bytes()).map(Some)
    }

    /// The trace id.
    ///
    /// ```
    /// use contextflow_http::{SpanId, TraceFlags, TraceId, TraceParent};
    /// let id = TraceId::random();
    /// assert_eq!(TraceParent::new(id, SpanId::random(), TraceFlags::NONE).trace_id(), id);
    /// ```
    pub const fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// The span id of the caller (the spec's `parent-id`).
    ///
    /// ```
    /// use contextflow_http::{SpanId, TraceFlags, TraceId, TraceParent};
    /// let id = SpanId::random();
    /// assert_eq!(TraceParent::new(TraceId::random(), id, TraceFlags::NONE).parent_id(), id);
    /// ```
    pub const fn parent_id(&self) -> SpanId {
        self.parent_id
    }

    /// The flags, as received.
    ///
    /// ```
    /// use contextflow_http::{SpanId, TraceFlags, TraceId, TraceParent};
    /// let tp = TraceParent::new(TraceId::random(), SpanId::random(), TraceFlags::SAMPLED);
    /// assert!(tp.flags().is_sampled());
    /// ```
    pub const fn flags(&self) -> TraceFlags {
        self.flags
    }

    /// The value as a header value (always version `00`).
    ///
    /// ```
    /// use contextflow_http::TraceParent;
    /// let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".parse()?;
    /// assert_eq!(tp.to_header_value(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
    /// # Ok::<(), contextflow_http::InvalidTraceParent>(())
    /// ```
    pub fn to_header_value(&self) -> HeaderValue {
        let mut buf = [0u8; TRACEPARENT_LEN];
        buf[..3].copy_from_slice(b"00-");
        encode_hex(&mut buf[3..35], &self.trace_id.0);
        buf[35] = b'-';
        encode_hex(&mut buf[36..52], &self.parent_id.0);
        buf[52] = b'-';
        encode_hex(&mut buf[53..55], &[self.flags.0]);
        // Cannot fail: the buffer holds hex digits and dashes only.
        HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static(""))
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
        write!(f, "00-{}-{}-{}", self.trace_id, self.parent_id, self.flags)
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

// ===== impl TraceContext =====

impl TraceContext {
    /// Starts a new trace: a random trace id (so the *random* flag is set), a random span id, no
    /// parent and an empty `tracestate`. `sampled` sets the *sampled* flag.
    ///
    /// ```
    /// use contextflow_http::TraceContext;
    /// let root = TraceContext::new_trace(true);
    /// assert!(root.flags().is_sampled() && root.flags().is_random());
    /// assert_eq!(root.parent_span_id(), None);
    /// ```
    pub fn new_trace(sampled: bool) -> Self {
        TraceContext {
            trace_id: TraceId::random(),
            span_id: SpanId::random(),
            flags: TraceFlags::RANDOM.with_sampled(sampled),
            parent_span_id: None,
            trace_state: TraceState::new(),
        }
    }

    /// Continues the trace of a caller: same trace id, a new span id for this service, the
    /// caller's known flags, and `trace_state`.
    ///
    /// ```
    /// use contextflow_http::{TraceContext, TraceParent};
    /// let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09".parse()?;
    /// let ctx = TraceContext::child_of(&tp, "vendor=x".parse()?);
    /// assert_eq!(ctx.flags().bits(), 0x01, "unknown flag bits are cleared");
    /// assert_eq!(ctx.trace_state().get("vendor"), Some("x"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn child_of(parent: &TraceParent, trace_state: TraceState) -> Self {
        TraceContext {
            trace_id: parent.trace_id,
            span_id: SpanId::random(),
            flags: parent.flags.known(),
            parent_span_id: Some(parent.parent_id),
            trace_state,
        }
    }

    /// The trace id.
    ///
    /// ```
    /// use contextflow_http::TraceContext;
    /// let ctx = TraceContext::new_trace(false);
    /// assert_eq!(ctx.trace_id(), ctx.traceparent().trace_id());
    /// ```
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// This service's span id for the current unit of work.
    ///
    /// ```
    /// use contextflow_http::TraceContext;
    /// let ctx = TraceContext::new_trace(false);
    /// assert_eq!(ctx.span_id(), ctx.traceparent().parent_id());
    /// ```
    pub fn span_id(&self) -> SpanId {
        self.span_id
    }

    /// The flags this service propagates.
    ///
    /// ```
    /// use contextflow_http::TraceContext;
    /// assert!(!TraceContext::new_trace(false).flags().is_sampled());
    /// ```
    pub fn flags(&self) -> TraceFlags {
        self.flags
    }

    /// The caller's span id, or `None` when this service started the trace.
    ///
    /// ```
    /// use contextflow_http::TraceContext;
    /// assert!(TraceContext::new_trace(true).parent_span_id().is_none());
    /// ```
    pub fn parent_span_id(&self) -> Option<SpanId> {
        self.parent_span_id
    }

    /// The vendors' `tracestate`.
    ///
    /// ```
    /// use contextflow_http::TraceContext;
    /// assert!(TraceContext::new_trace(true).trace_state().is_empty());
    /// ```
    pub fn trace_state(&self) -> &TraceState {
        &self.trace_state
    }

    /// This context with another `tracestate` (for a vendor that updates its member).
    ///
    /// ```
    /// use contextflow_http::TraceContext;
    /// let mut state = TraceContext::new_trace(true).trace_state().clone();
    /// state.insert("congo", "t61rcWkgMzE")?;
    /// let ctx = TraceContext::new_trace(true).with_trace_state(state);
    /// assert_eq!(ctx.trace_state().to_string(), "congo=t61rcWkgMzE");
    /// # Ok::<(), contextflow_http::InvalidTraceState>(())
    /// ```
    pub fn with_trace_state(mut self, trace_state: TraceState) -> Self {
        self.trace_state = trace_state;
        self
    }

    /// The `traceparent` naming this service's span as the parent.
    ///
    /// ```
    /// use contextflow_http::TraceContext;
    /// let ctx = TraceContext::new_trace(true);
    /// assert_eq!(ctx.traceparent().flags(), ctx.flags());
    /// ```
    pub fn traceparent(&self) -> TraceParent {
        TraceParent::new(self.trace_id, self.span_id, self.flags)
    }

    /// A `traceparent` for one outgoing call: same trace id and flags, a new span id.
    ///
    /// ```
    /// use contextflow_http::TraceContext;
    /// let ctx = TraceContext::new_trace(true);
    /// let (a, b) = (ctx.child_traceparent(), ctx.child_traceparent());
    /// assert_eq!(a.trace_id(), b.trace_id());
    /// assert_ne!(a.parent_id(), b.parent_id());
    /// ```
    pub fn child_traceparent(&self) -> TraceParent {
        TraceParent::new(self.trace_id, SpanId::random(), self.flags)
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("trace_id", &format_args!("{}", self.trace_id))
            .field("span_id", &format_args!("{}", self.span_id))
            .field("flags", &format_args!("{}", self.flags))
            .field(
                "parent_span_id",
                &self.parent_span_id.map(|id| id.to_string()),
            )
            .field("trace_state", &self.trace_state)
            .finish()
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
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn encode_hex(out: &mut [u8], bytes: &[u8]) {
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0x0f)];
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    let mut buf = [0u8; 32];
    let out = &mut buf[..bytes.len() * 2];
    encode_hex(out, bytes);
    // Hex digits are ASCII, so the conversion cannot fail.
    f.write_str(std::str::from_utf8(out).unwrap_or_default())
}
