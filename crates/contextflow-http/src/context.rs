//! The context variables this crate sets, their accessors, and header extraction/injection.
//!
//! The server layer binds [`TRACE_CONTEXT`], [`REQUEST_ID`] and [`BAGGAGE`] for the whole
//! request; the client layers read them to fill outgoing headers. They hold infrastructure
//! metadata only: the tenant and the user come from authenticated code, in variables of the
//! application's own.

use std::{fmt, future::Future};

use contextflow::{AsyncLocal, FutureExt as _, Snapshot, WithContext};
use http::{HeaderMap, HeaderValue};

use crate::{
    Baggage, RequestId, SpanId, TraceContext, TraceId, TraceParent, TraceState, BAGGAGE_HEADER,
    TRACEPARENT, TRACESTATE, X_REQUEST_ID,
};

/// The W3C trace context of the current request: trace id, this service's span id, flags and
/// `tracestate`.
///
/// ```
/// use contextflow_http::{TraceContext, TRACE_CONTEXT};
///
/// let ctx = TraceContext::new_trace(true);
/// let id = TRACE_CONTEXT.sync_scope(ctx.clone(), contextflow_http::current_trace_id);
/// assert_eq!(id, Some(ctx.trace_id()));
/// ```
pub static TRACE_CONTEXT: AsyncLocal<TraceContext> = AsyncLocal::named("trace_context");

/// The request id of the current request.
///
/// ```
/// use contextflow_http::{RequestId, REQUEST_ID};
///
/// let id: RequestId = "req-1".parse()?;
/// REQUEST_ID.sync_scope(id, || {
///     assert_eq!(contextflow_http::current_request_id().unwrap().as_str(), "req-1");
/// });
/// # Ok::<(), contextflow_http::InvalidRequestId>(())
/// ```
pub static REQUEST_ID: AsyncLocal<RequestId> = AsyncLocal::named("request_id");

/// The W3C baggage of the current request.
///
/// ```
/// use contextflow_http::{Baggage, BAGGAGE};
///
/// BAGGAGE.sync_scope(Baggage::parse("env=staging"), || {
///     assert_eq!(contextflow_http::current_baggage_value("env").as_deref(), Some("staging"));
/// });
/// ```
pub static BAGGAGE: AsyncLocal<Baggage> = AsyncLocal::named("baggage");

/// What a service takes from an incoming request: its trace context (continued, or a new
/// trace), its request id (honoured, or a new one) and its baggage.
///
/// The server layer uses it; use it directly for other transports that carry HTTP-style
/// headers (a message queue's metadata, a job's environment).
///
/// ```
/// use contextflow_http::{IncomingContext, REQUEST_ID};
/// use http::HeaderMap;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut headers = HeaderMap::new();
/// headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?);
/// headers.insert("x-request-id", "bad id".parse()?);
///
/// let incoming = IncomingContext::from_headers(&headers);
/// assert_eq!(incoming.trace_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_ne!(incoming.request_id().as_str(), "bad id", "an invalid id is replaced");
///
/// let id = incoming.clone().scope(async { REQUEST_ID.get() }).await;
/// assert_eq!(id.as_ref(), Some(incoming.request_id()));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct IncomingContext {
    trace_context: TraceContext,
    request_id: RequestId,
    baggage: Baggage,
}

// ===== accessors =====

/// The current trace id, if a trace context is set.
///
/// ```
/// assert_eq!(contextflow_http::current_trace_id(), None);
/// ```
pub fn current_trace_id() -> Option<TraceId> {
    TRACE_CONTEXT.with(|ctx| ctx.map(TraceContext::trace_id))
}

/// This service's span id for the current request, if a trace context is set.
///
/// ```
/// use contextflow_http::{TraceContext, TRACE_CONTEXT};
/// let ctx = TraceContext::new_trace(true);
/// let span = TRACE_CONTEXT.sync_scope(ctx.clone(), contextflow_http::current_span_id);
/// assert_eq!(span, Some(ctx.span_id()));
/// ```
pub fn current_span_id() -> Option<SpanId> {
    TRACE_CONTEXT.with(|ctx| ctx.map(TraceContext::span_id))
}

/// The `traceparent` naming this service's current span, if a trace context is set (for a log
/// line or a response header; outgoing calls get a new span id each, see
/// [`inject_headers`]).
///
/// ```
/// use contextflow_http::{TraceContext, TRACE_CONTEXT};
/// let ctx = TraceContext::new_trace(true);
/// let tp = TRACE_CONTEXT.sync_scope(ctx.clone(), contextflow_http::current_traceparent);
/// assert_eq!(tp, Some(ctx.traceparent()));
/// ```
pub fn current_traceparent() -> Option<TraceParent> {
    TRACE_CONTEXT.with(|ctx| ctx.map(TraceContext::traceparent))
}

/// The current request id, if set.
///
/// ```
/// assert!(contextflow_http::current_request_id().is_none());
/// ```
pub fn current_request_id() -> Option<RequestId> {
    REQUEST_ID.get()
}

/// The value of baggage member `key` in the current context.
///
/// ```
/// use contextflow_http::{Baggage, BAGGAGE};
/// let v = BAGGAGE.sync_scope(Baggage::parse("a=1"), || contextflow_http::current_baggage_value("a"));
/// assert_eq!(v.as_deref(), Some("1"));
/// ```
pub fn current_baggage_value(key: &str) -> Option<String> {
    BAGGAGE.with(|baggage| baggage.and_then(|b| b.get(key)).map(str::to_owned))
}

/// Writes the current context into outgoing request headers: `traceparent` (same trace id and
/// flags, a new span id), `tracestate`, `baggage` and `x-request-id`.
///
/// A header the caller already set is left alone; when the caller set `traceparent`, its
/// `tracestate` is left alone too (the two go together). Nothing is written for a variable
/// that is not set.
///
/// ```
/// use contextflow_http::{inject_headers, RequestId, TraceContext, REQUEST_ID, TRACE_CONTEXT};
/// use http::HeaderMap;
///
/// let ctx = TraceContext::new_trace(true);
/// let mut headers = HeaderMap::new();
/// headers.insert("x-request-id", "set-by-caller".parse()?);
/// TRACE_CONTEXT.sync_scope(ctx.clone(), || {
///     REQUEST_ID.sync_scope(RequestId::new(), || inject_headers(&mut headers))
/// });
/// let tp: contextflow_http::TraceParent = headers["traceparent"].to_str()?.parse()?;
/// assert_eq!(tp.trace_id(), ctx.trace_id());
/// assert_ne!(tp.parent_id(), ctx.span_id());
/// assert_eq!(headers["x-request-id"], "set-by-caller");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn inject_headers(headers: &mut HeaderMap) {
    if !headers.contains_key(TRACEPARENT) {
        TRACE_CONTEXT.with(|ctx| {
            if let Some(ctx) = ctx {
                headers.insert(TRACEPARENT, ctx.child_traceparent().to_header_value());
                if let Some(state) = ctx.trace_state().to_header_value() {
                    headers.insert(TRACESTATE, state);
                }
            }
        });
    }
    if !headers.contains_key(BAGGAGE_HEADER) {
        if let Some(value) = BAGGAGE.with(|b| b.and_then(Baggage::to_header_value)) {
            headers.insert(BAGGAGE_HEADER, value);
        }
    }
    if !headers.contains_key(X_REQUEST_ID) {
        if let Some(value) = REQUEST_ID.with(|id| id.map(|id| id.header_value().clone())) {
            headers.insert(X_REQUEST_ID, value);
        }
    }
}

// ===== impl IncomingContext =====

impl IncomingContext {
    /// Reads the context of an incoming request. Never fails: a malformed value is dropped with
    /// a `debug` log (the value escaped and cut to 64 bytes) and a fresh one made. A new trace
    /// is marked sampled.
    ///
    /// ```
    /// use contextflow_http::IncomingContext;
    /// use http::HeaderMap;
    ///
    /// let incoming = IncomingContext::from_headers(&HeaderMap::new());
    /// assert!(incoming.trace_context().parent_span_id().is_none(), "a new trace");
    /// assert!(incoming.baggage().is_empty());
    /// ```
    pub fn from_headers(headers: &HeaderMap) -> Self {
        IncomingContext::from_headers_with(headers, true)
    }

    /// As [`from_headers`](IncomingContext::from_headers), with the *sampled* flag of a new trace
    /// set to `sample_new_traces`.
    ///
    /// ```
    /// use contextflow_http::IncomingContext;
    /// use http::HeaderMap;
    /// let incoming = IncomingContext::from_headers_with(&HeaderMap::new(), false);
    /// assert!(!incoming.trace_context().flags().is_sampled());
    /// ```
    pub fn from_headers_with(headers: &HeaderMap, sample_new_traces: bool) -> Self {
        IncomingContext {
            trace_context: extract_trace_context(headers, sample_new_traces),
            request_id: extract_request_id(headers),
            baggage: extract_baggage(headers),
        }
    }

    /// An incoming context from its parts.
    ///
    /// ```
    /// use contextflow_http::{Baggage, IncomingContext, RequestId, TraceContext};
    /// let incoming = IncomingContext::new(TraceContext::new_trace(true), RequestId::new(), Baggage::new());
    /// assert!(incoming.baggage().is_empty());
    /// ```
    pub fn new(trace_context: TraceContext, request_id: RequestId, baggage: Baggage) -> Self {
        IncomingContext {
            trace_context,
            request_id,
            baggage,
        }
    }

    /// The trace context: the caller's trace continued with a new span id, or a new trace.
    ///
    /// ```
    /// use contextflow_http::IncomingContext;
    /// let incoming = IncomingContext::from_headers(&http::HeaderMap::new());
    /// assert!(incoming.trace_context().flags().is_random());
    /// ```
    pub fn trace_context(&self) -> &TraceContext {
        &self.trace_context
    }

    /// The request id: the caller's when valid, otherwise a new one.
    ///
    /// ```
    /// use contextflow_http::IncomingContext;
    /// let mut headers = http::HeaderMap::new();
    /// headers.insert("x-request-id", "abc".parse()?);
    /// assert_eq!(IncomingContext::from_headers(&headers).request_id().as_str(), "abc");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn request_id(&self) -> &RequestId {
        &self.request_id
    }

    /// The baggage (its valid members).
    ///
    /// ```
    /// use contextflow_http::IncomingContext;
    /// let mut headers = http::HeaderMap::new();
    /// headers.insert("baggage", "a=1,b c=2".parse()?);
    /// assert_eq!(IncomingContext::from_headers(&headers).baggage().len(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn baggage(&self) -> &Baggage {
        &self.baggage
    }

    /// The current context plus the three variables, captured as a [`Snapshot`].
    ///
    /// ```
    /// use contextflow_http::{IncomingContext, REQUEST_ID};
    /// let incoming = IncomingContext::from_headers(&http::HeaderMap::new());
    /// let snapshot = incoming.clone().into_snapshot();
    /// assert_eq!(snapshot.get(&REQUEST_ID).as_ref(), Some(incoming.request_id()));
    /// ```
    pub fn into_snapshot(self) -> Snapshot {
        let IncomingContext {
            trace_context,
            request_id,
            baggage,
        } = self;
        TRACE_CONTEXT.sync_scope(trace_context, || {
            REQUEST_ID.sync_scope(request_id, || {
                BAGGAGE.sync_scope(baggage, Snapshot::capture)
            })
        })
    }

    /// Runs `fut` with the three variables set, on top of the current context.
    ///
    /// ```
    /// use contextflow_http::IncomingContext;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let incoming = IncomingContext::from_headers(&http::HeaderMap::new());
    /// let trace_id = incoming.trace_context().trace_id();
    /// let seen = incoming.scope(async { contextflow_http::current_trace_id() }).await;
    /// assert_eq!(seen, Some(trace_id));
    /// # }
    /// ```
    pub fn scope<F: Future>(self, fut: F) -> WithContext<F> {
        fut.with_snapshot(self.into_snapshot())
    }
}

// ===== extraction =====

pub(crate) fn extract_trace_context(headers: &HeaderMap, sample_new_traces: bool) -> TraceContext {
    match TraceParent::from_headers(headers) {
        Ok(Some(parent)) => {
            let state = match TraceState::from_headers(headers) {
                Ok(state) => state,
                Err(err) => {
                    tracing::debug!(
                        reason = %err,
                        value = %Escaped(headers.get(TRACESTATE)),
                        "dropped malformed tracestate"
                    );
                    TraceState::new()
                }
            };
            TraceContext::child_of(&parent, state)
        }
        Ok(None) => TraceContext::new_trace(sample_new_traces),
        Err(err) => {
            tracing::debug!(
                reason = %err,
                value = %Escaped(headers.get(TRACEPARENT)),
                "dropped malformed traceparent; starting a new trace"
            );
            TraceContext::new_trace(sample_new_traces)
        }
    }
}

pub(crate) fn extract_request_id(headers: &HeaderMap) -> RequestId {
    match RequestId::from_headers(headers) {
        Ok(Some(id)) => id,
        Ok(None) => RequestId::new(),
        Err(err) => {
            tracing::debug!(
                reason = %err,
                value = %Escaped(headers.get(X_REQUEST_ID)),
                "dropped malformed request id; made a new one"
            );
            RequestId::new()
        }
    }
}

pub(crate) fn extract_baggage(headers: &HeaderMap) -> Baggage {
    let (baggage, dropped) = Baggage::from_headers_counting(headers);
    if dropped > 0 {
        tracing::debug!(
            dropped,
            value = %Escaped(headers.get(BAGGAGE_HEADER)),
            "dropped malformed or excess baggage members"
        );
    }
    baggage
}

/// An untrusted header value made safe for a log line: escaped as ASCII (no control
/// characters, no newlines, no non-ASCII bytes) and cut to 64 bytes.
pub(crate) struct Escaped<'a>(pub(crate) Option<&'a HeaderValue>);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 64;
        let bytes = self.0.map_or(&[][..], HeaderValue::as_bytes);
        write!(f, "\"{}\"", bytes[..bytes.len().min(MAX)].escape_ascii())?;
        if bytes.len() > MAX {
            write!(f, "... ({} bytes)", bytes.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_hides_control_characters() {
        let value = HeaderValue::from_bytes(b"a\t\"b\xff\\").unwrap();
        let shown = Escaped(Some(&value)).to_string();
        assert_eq!(shown, r#""a\t\"b\xff\\""#);
        let long = HeaderValue::from_bytes(&[b'x'; 100]).unwrap();
        assert!(Escaped(Some(&long))
            .to_string()
            .ends_with("... (100 bytes)"));
    }
}
