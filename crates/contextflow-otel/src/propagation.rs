//! Propagators: what crosses a process boundary, as OpenTelemetry `TextMapPropagator`s.
//!
//! - [`TraceContextPropagator`]: W3C `traceparent` and `tracestate`, strict (it passes the
//!   W3C test suite's strictest level); the extracted span context is a remote parent.
//! - [`BaggagePropagator`]: W3C `baggage` into OpenTelemetry's `Baggage`.
//! - [`RequestIdPropagator`]: `x-request-id`, validated, or a fresh id when missing or
//!   malformed.
//!
//! They compose with the ecosystem's (B3 from `opentelemetry-zipkin`, Jaeger, Datadog...)
//! through `TextMapCompositePropagator`. [`Propagation`] is what transports use: the trace
//! propagator (by default OpenTelemetry's global one, see [`Propagation::global`]) plus the
//! request id, with the bounds of [`carrier`](crate::carrier) on what is read.
//!
//! ```
//! use contextflow_otel::{default_propagator, carrier::Pairs};
//! use opentelemetry::{propagation::TextMapPropagator, trace::TraceContextExt};
//!
//! let propagator = default_propagator();
//! let cx = propagator.extract(&Pairs::new([
//!     ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
//!     ("baggage", "env=staging"),
//! ]));
//! assert_eq!(cx.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
//! ```

use std::{
    any::TypeId,
    sync::{Arc, LazyLock},
};

use opentelemetry::{
    baggage::BaggageExt as _,
    propagation::{
        text_map_propagator::FieldIter, Extractor, Injector, TextMapCompositePropagator,
        TextMapPropagator,
    },
    trace::TraceContextExt as _,
    Context,
};

use crate::{
    carrier::{Bounded, BoundedFields, Escaped, FieldValues, ScannedFields, Source},
    traceparent::format_traceparent,
    Baggage, RequestId, TraceParent, TraceState, BAGGAGE, REQUEST_ID, TRACEPARENT, TRACESTATE,
    X_REQUEST_ID,
};

/// W3C Trace Context (`traceparent`, `tracestate`) as a `TextMapPropagator`.
///
/// Extraction makes the caller's span the remote parent; a missing, malformed or repeated
/// `traceparent` leaves the context as it was (and drops `tracestate`). Injection writes the
/// context's span (the current span: a server span, a client span, a `tracing` span bridged
/// by `tracing-opentelemetry`) as `parent-id`, with the known flags only.
///
/// ```
/// use contextflow_otel::{carrier::Pairs, TraceContextPropagator};
/// use opentelemetry::propagation::TextMapPropagator;
/// use std::collections::HashMap;
///
/// let cx = TraceContextPropagator::new().extract(&Pairs::new([
///     ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
///     ("tracestate", "foo@@bar=1,congo=t61rcWkgMzE"),
/// ]));
/// let mut out = HashMap::new();
/// TraceContextPropagator::new().inject_context(&cx, &mut out);
/// assert_eq!(out["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert_eq!(out["tracestate"], "foo@@bar=1,congo=t61rcWkgMzE");
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceContextPropagator {
    _private: (),
}

/// W3C Baggage as a `TextMapPropagator`: `baggage` into OpenTelemetry's `Baggage` (values and
/// property values percent-decoded, invalid members dropped) and back.
///
/// ```
/// use contextflow_otel::{carrier::Pairs, BaggagePropagator};
/// use opentelemetry::{baggage::BaggageExt, propagation::TextMapPropagator};
///
/// let cx = BaggagePropagator::new().extract(&Pairs::new([("baggage", "user=al%20ice,bad key=1")]));
/// assert_eq!(cx.baggage().get("user").map(|v| v.as_str()), Some("al ice"));
/// assert_eq!(cx.baggage().len(), 1);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct BaggagePropagator {
    _private: (),
}

/// The request id (`x-request-id`) as a `TextMapPropagator`.
///
/// Extraction always leaves a [`RequestId`] in the context: the caller's when valid, else the
/// one the context already had, else a fresh one (a malformed or repeated value is dropped
/// with a `debug` log). Injection writes
/// the context's request id, or the current one ([`REQUEST_ID`]).
///
/// ```
/// use contextflow_otel::{carrier::Pairs, RequestId, RequestIdPropagator};
/// use opentelemetry::propagation::TextMapPropagator;
///
/// let cx = RequestIdPropagator::new().extract(&Pairs::new([("x-request-id", "two words")]));
/// let id = cx.get::<RequestId>().unwrap();
/// assert_ne!(id.as_str(), "two words", "an invalid id is replaced");
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestIdPropagator {
    _private: (),
}

/// Where a transport's trace propagator comes from, plus the request id: what the HTTP and
/// gRPC layers (and message carriers) use to extract and inject.
///
/// ```
/// use contextflow_otel::{carrier::Pairs, Propagation, RequestId};
/// use opentelemetry::trace::TraceContextExt;
///
/// let cx = Propagation::global().extract(&Pairs::new([
///     ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
///     ("x-request-id", "r-1"),
/// ]));
/// assert!(cx.span().span_context().is_remote());
/// assert_eq!(cx.get::<RequestId>().unwrap().as_str(), "r-1");
/// ```
#[derive(Clone, Debug, Default)]
pub struct Propagation {
    /// `None`: the global propagator (or the default when none is installed).
    trace: Option<Arc<dyn TextMapPropagator + Send + Sync>>,
    /// `trace` is contextflow's own `TraceContextPropagator`, read directly on the fast path.
    trace_context_only: bool,
}

/// The full `tracestate` next to the span context whose OpenTelemetry `TraceState` kept only
/// the members that OpenTelemetry's older key grammar accepts; for the received trace only.
#[derive(Debug)]
struct FullTraceState {
    trace_id: opentelemetry::trace::TraceId,
    full: TraceState,
    projected: opentelemetry::trace::TraceState,
}

static TRACE_CONTEXT_FIELDS: LazyLock<[String; 2]> =
    LazyLock::new(|| [TRACEPARENT.to_owned(), TRACESTATE.to_owned()]);
static BAGGAGE_FIELDS: LazyLock<[String; 1]> = LazyLock::new(|| [BAGGAGE.to_owned()]);
static REQUEST_ID_FIELDS: LazyLock<[String; 1]> = LazyLock::new(|| [X_REQUEST_ID.to_owned()]);

/// The W3C trace context and baggage: what [`Propagation::global`] uses when no global
/// propagator is installed.
static FALLBACK: LazyLock<TextMapCompositePropagator> = LazyLock::new(|| {
    TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ])
});

/// contextflow's propagators composed: W3C trace context, W3C baggage and the request id.
/// Install it as the global propagator, or compose it further with other formats.
///
/// ```
/// opentelemetry::global::set_text_map_propagator(contextflow_otel::default_propagator());
/// ```
pub fn default_propagator() -> TextMapCompositePropagator {
    TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
        Box::new(RequestIdPropagator::new()),
    ])
}

/// Reads the context that `extractor` carries with the global propagation (see
/// [`Propagation::global`]), on top of the current context. Never fails: malformed values
/// are dropped with a `debug` log; the result always holds a [`RequestId`].
///
/// ```
/// use contextflow_otel::carrier::Pairs;
/// let cx = contextflow_otel::extract(&Pairs::new([("x-request-id", "r-2")]));
/// assert_eq!(contextflow_otel::sync_scope(cx, contextflow_otel::current_request_id).unwrap().as_str(), "r-2");
/// ```
pub fn extract(extractor: &dyn Extractor) -> Context {
    Propagation::global().extract(extractor)
}

/// Writes the current context ([`current_context`](crate::current_context) and the current
/// request id) into `injector` with the global propagation.
///
/// ```
/// use std::collections::HashMap;
/// let cx = contextflow_otel::extract(&contextflow_otel::carrier::Pairs::new([("x-request-id", "r-3")]));
/// let mut out = HashMap::new();
/// contextflow_otel::sync_scope(cx, || contextflow_otel::inject(&mut out));
/// assert_eq!(out["x-request-id"], "r-3");
/// ```
pub fn inject(injector: &mut dyn Injector) {
    Propagation::global().inject(&crate::current_context(), injector)
}

// ===== impl TraceContextPropagator =====

impl TraceContextPropagator {
    /// The propagator.
    ///
    /// ```
    /// use opentelemetry::propagation::TextMapPropagator;
    /// let propagator = contextflow_otel::TraceContextPropagator::new();
    /// let fields: Vec<_> = propagator.fields().collect();
    /// assert_eq!(fields, ["traceparent", "tracestate"]);
    /// ```
    pub const fn new() -> Self {
        TraceContextPropagator { _private: () }
    }
}

impl TextMapPropagator for TraceContextPropagator {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return;
        }
        injector.set(
            TRACEPARENT,
            format_traceparent(sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8() & 0x03),
        );
        let state = match cx.get::<FullTraceState>() {
            // The received list goes on with the received trace only (a new trace started in
            // the request starts its own list).
            Some(full) if full.trace_id == sc.trace_id() => {
                if full.projected == *sc.trace_state() {
                    full.full.to_string()
                } else {
                    // Changed by a sampler or the application: its members in front, then the
                    // received ones it kept or never saw, in their order.
                    full.full
                        .updated_by(&full.projected, sc.trace_state())
                        .to_string()
                }
            }
            _ if sc.trace_state().header().is_empty() => String::new(),
            // OpenTelemetry's own checks let values through that the W3C grammar refuses (a
            // CR/LF, an empty value, spaces, non-ASCII): such members are left out, not sent
            // into a carrier, and the list is bounded (32 members, 512 characters).
            _ => TraceState::from_otel(sc.trace_state()).to_string(),
        };
        if !state.is_empty() {
            injector.set(TRACESTATE, state);
        }
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        extract_trace_context(cx, &Unbounded(extractor))
    }

    fn fields(&self) -> FieldIter<'_> {
        FieldIter::new(&*TRACE_CONTEXT_FIELDS)
    }
}

/// An extractor read as a [`Source`] with no bounds (a propagator called directly is given
/// what the caller hands it; [`Propagation`] adds the bounds).
struct Unbounded<'a>(&'a dyn Extractor);

impl Source for Unbounded<'_> {
    fn first(&self, key: &str) -> Option<&[u8]> {
        self.0.get(key).map(str::as_bytes)
    }

    fn single(&self, key: &str) -> Option<Result<&[u8], &[u8]>> {
        let values = self.0.get_all(key)?;
        Some(match values.as_slice() {
            [one] => Ok(one.as_bytes()),
            // An empty list counts as a malformed value, as a list of two does.
            _ => Err(values.first().map_or(&b""[..], |v| v.as_bytes())),
        })
    }

    fn all(&self, key: &str) -> Option<Vec<&[u8]>> {
        Some(
            self.0
                .get_all(key)?
                .into_iter()
                .map(str::as_bytes)
                .collect(),
        )
    }
}

/// [`TraceContextPropagator`]'s extraction from any [`Source`].
fn extract_trace_context(cx: &Context, source: &impl Source) -> Context {
    let Some(parent) = extract_traceparent(source) else {
        return cx.clone();
    };
    // A full list an outer extraction kept (for the same trace, maybe) must not be sent with
    // this one's span context: shadowed unless this extraction keeps one of its own.
    let shadowed;
    let cx = if cx.get::<FullTraceState>().is_some() {
        shadowed = cx.with_value(FullTraceState {
            trace_id: opentelemetry::trace::TraceId::INVALID,
            full: TraceState::new(),
            projected: opentelemetry::trace::TraceState::default(),
        });
        &shadowed
    } else {
        cx
    };
    if !present(source, TRACESTATE) {
        return cx.with_remote_span_context(
            parent.to_remote_span_context(opentelemetry::trace::TraceState::default()),
        );
    }
    let values = source.all(TRACESTATE).unwrap_or_default();
    let full = match TraceState::from_values(values.iter().copied()) {
        Ok(state) => state,
        Err(err) => {
            tracing::debug!(
                reason = %err,
                value = %Escaped(values.first().copied().unwrap_or(b"")),
                "dropped malformed tracestate"
            );
            TraceState::new()
        }
    };
    let projected = full.to_otel();
    let complete = projected.header().len() == full.to_string().len();
    let cx = cx.with_remote_span_context(parent.to_remote_span_context(projected.clone()));
    if complete {
        cx
    } else {
        cx.with_value(FullTraceState {
            trace_id: parent.trace_id(),
            full,
            projected,
        })
    }
}

/// The one valid `traceparent`, or `None` (with a `debug` log when one was there).
fn extract_traceparent(source: &impl Source) -> Option<TraceParent> {
    let values = source.single(TRACEPARENT)?;
    let (parsed, first) = match values {
        Ok(one) => (TraceParent::parse_bytes(one), one),
        Err(first) => (
            Err(crate::InvalidTraceParent::new(
                "more than one traceparent value",
            )),
            first,
        ),
    };
    match parsed {
        Ok(parent) => Some(parent),
        Err(err) => {
            tracing::debug!(
                reason = %err,
                value = %Escaped(first),
                "dropped malformed traceparent"
            );
            None
        }
    }
}

// ===== impl BaggagePropagator =====

impl BaggagePropagator {
    /// The propagator.
    ///
    /// ```
    /// use opentelemetry::propagation::TextMapPropagator;
    /// let propagator = contextflow_otel::BaggagePropagator::new();
    /// let fields: Vec<_> = propagator.fields().collect();
    /// assert_eq!(fields, ["baggage"]);
    /// ```
    pub const fn new() -> Self {
        BaggagePropagator { _private: () }
    }
}

impl TextMapPropagator for BaggagePropagator {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        let otel = cx.baggage();
        if otel.is_empty() {
            return;
        }
        let baggage = Baggage::from_otel(otel);
        if !baggage.is_empty() {
            injector.set(BAGGAGE, baggage.to_string());
        }
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        extract_baggage(cx, &Unbounded(extractor))
    }

    fn fields(&self) -> FieldIter<'_> {
        FieldIter::new(&*BAGGAGE_FIELDS)
    }
}

/// `cx` holding `id` when it holds another request id (the outer context's, kept by the
/// extraction), so that the context and the id given back never disagree; as it is otherwise
/// (no id in it: nothing to add).
fn agreeing(cx: Context, id: &RequestId) -> Context {
    match cx.get::<RequestId>() {
        Some(held) if !held.same(id) => cx.with_value(id.clone()),
        _ => cx,
    }
}

/// [`BaggagePropagator`]'s extraction from any [`Source`].
fn extract_baggage(cx: &Context, source: &impl Source) -> Context {
    if !present(source, BAGGAGE) {
        return cx.clone();
    }
    let Some(values) = source.all(BAGGAGE) else {
        return cx.clone();
    };
    let (baggage, dropped) = Baggage::from_values(values.iter().copied());
    if dropped > 0 {
        // The members' values are not logged: baggage carries user and session data.
        tracing::debug!(
            dropped,
            bytes = values.iter().map(|v| v.len()).sum::<usize>(),
            "dropped malformed or excess baggage members"
        );
    }
    if baggage.is_empty() {
        return cx.clone();
    }
    cx.with_baggage(baggage.to_otel())
}

// ===== impl RequestIdPropagator =====

impl RequestIdPropagator {
    /// The propagator.
    ///
    /// ```
    /// use opentelemetry::propagation::TextMapPropagator;
    /// let propagator = contextflow_otel::RequestIdPropagator::new();
    /// let fields: Vec<_> = propagator.fields().collect();
    /// assert_eq!(fields, ["x-request-id"]);
    /// ```
    pub const fn new() -> Self {
        RequestIdPropagator { _private: () }
    }

    /// The request id `extractor` carries: the caller's when valid, else a fresh one.
    ///
    /// ```
    /// use contextflow_otel::{carrier::Pairs, RequestIdPropagator};
    /// let id = RequestIdPropagator::extract_id(&Pairs::new([("X-Request-Id", "r-9")]));
    /// assert_eq!(id.as_str(), "r-9");
    /// ```
    pub fn extract_id(extractor: &dyn Extractor) -> RequestId {
        extract_request_id(&Unbounded(extractor))
    }
}

/// Whether `key` has a value in `source` ([`Source::present`]).
fn present(source: &impl Source, key: &str) -> bool {
    source.present(key)
}

/// [`RequestIdPropagator::extract_id`] from any [`Source`].
fn extract_request_id(source: &impl Source) -> RequestId {
    read_request_id(source).unwrap_or_else(RequestId::new)
}

/// The carrier's request id, when it has exactly one and it is valid (a malformed or repeated
/// one is dropped with a `debug` log).
fn read_request_id(source: &impl Source) -> Option<RequestId> {
    if !present(source, X_REQUEST_ID) {
        return None;
    }
    let values = source.single(X_REQUEST_ID)?;
    let (parsed, first) = match values {
        Ok(one) => (RequestId::parse_bytes(one), one),
        Err(first) => (
            Err(crate::InvalidRequestId::new("more than one value")),
            first,
        ),
    };
    parsed
        .map_err(|err| {
            tracing::debug!(
                reason = %err,
                value = %Escaped(first),
                "dropped malformed request id"
            );
        })
        .ok()
}

impl TextMapPropagator for RequestIdPropagator {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        let id = match cx.get::<RequestId>() {
            Some(id) => Some(id.as_str().to_owned()),
            None => REQUEST_ID.with(|id| id.map(|id| id.as_str().to_owned())),
        };
        if let Some(id) = id {
            injector.set(X_REQUEST_ID, id);
        }
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        match read_request_id(&Unbounded(extractor)) {
            Some(id) => cx.with_value(id),
            // Nothing usable in the carrier: a request id already in the context stays (as
            // OpenTelemetry asks of a propagator that reads nothing), else a fresh one.
            None if cx.get::<RequestId>().is_some() => cx.clone(),
            None => cx.with_value(RequestId::new()),
        }
    }

    fn fields(&self) -> FieldIter<'_> {
        FieldIter::new(&*REQUEST_ID_FIELDS)
    }
}

/// An [`Injector`] that passes everything on but `x-request-id` (in any case).
struct WithoutRequestId<'a>(&'a mut dyn Injector);

impl Injector for WithoutRequestId<'_> {
    fn set(&mut self, key: &str, value: String) {
        if !key.eq_ignore_ascii_case(X_REQUEST_ID) {
            self.0.set(key, value);
        }
    }
}

// ===== impl Propagation =====

impl Propagation {
    /// OpenTelemetry's global propagator (`opentelemetry::global::set_text_map_propagator`),
    /// read at each use; when none is installed (OpenTelemetry's default is a no-op),
    /// contextflow's W3C trace context and baggage. The request id is always propagated too.
    ///
    /// ```
    /// let propagation = contextflow_otel::Propagation::global();
    /// # drop(propagation);
    /// ```
    pub fn global() -> Self {
        Propagation {
            trace: None,
            trace_context_only: false,
        }
    }

    /// `propagator` for the trace context (and whatever else it carries), plus the request id.
    ///
    /// ```
    /// use contextflow_otel::{Propagation, TraceContextPropagator};
    /// let propagation = Propagation::with_propagator(TraceContextPropagator::new());
    /// # drop(propagation);
    /// ```
    pub fn with_propagator<P: TextMapPropagator + Send + Sync + 'static>(propagator: P) -> Self {
        Propagation {
            trace: Some(Arc::new(propagator)),
            trace_context_only: TypeId::of::<P>() == TypeId::of::<TraceContextPropagator>(),
        }
    }

    /// Reads what `extractor` carries on top of the current context; the result always holds
    /// a [`RequestId`].
    ///
    /// ```
    /// use contextflow_otel::{carrier::Pairs, Propagation, RequestId};
    /// let cx = Propagation::global().extract(&Pairs::default());
    /// assert_eq!(cx.get::<RequestId>().unwrap().as_str().len(), 36, "a fresh id");
    /// ```
    pub fn extract(&self, extractor: &dyn Extractor) -> Context {
        self.extract_with_context(&Context::current(), extractor)
    }

    /// Reads what `extractor` carries on top of `cx`.
    ///
    /// ```
    /// use contextflow_otel::{carrier::Pairs, Propagation};
    /// use opentelemetry::{trace::TraceContextExt, Context};
    /// let cx = Propagation::global().extract_with_context(&Context::new(), &Pairs::default());
    /// assert!(!cx.has_active_span());
    /// ```
    pub fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        let (cx, id) = self.extract_parts(cx, extractor);
        cx.with_value(id)
    }

    /// Reads what `extractor` carries on top of `cx`, the request id apart (so a server can
    /// bind it without adding a value to the context).
    ///
    /// ```
    /// use contextflow_otel::{carrier::Pairs, Propagation, RequestId};
    /// use opentelemetry::Context;
    /// let (cx, id) = Propagation::global().extract_parts(&Context::new(), &Pairs::new([("x-request-id", "r-6")]));
    /// assert_eq!(id.as_str(), "r-6");
    /// assert!(cx.get::<RequestId>().is_none());
    /// ```
    pub fn extract_parts(&self, cx: &Context, extractor: &dyn Extractor) -> (Context, RequestId) {
        let bounded = Bounded(extractor);
        let outer = cx.get::<RequestId>();
        let cx = self.extract_trace(cx, &bounded);
        // A trace propagator that carries the request id itself (`default_propagator()`
        // installed as the global one) has read it already: the same id, not a second one
        // (for a carrier without one, two fresh ids would differ).
        match cx.get::<RequestId>() {
            Some(id) if !outer.is_some_and(|outer| outer.same(id)) => {
                let id = id.clone();
                (cx, id)
            }
            _ => {
                let id = RequestIdPropagator::extract_id(&bounded);
                (agreeing(cx, &id), id)
            }
        }
    }

    /// [`extract_parts`](Self::extract_parts) for a carrier that hands out raw values: with
    /// contextflow's own propagators (no global propagator installed, or
    /// [`TraceContextPropagator`] given to [`with_propagator`](Self::with_propagator)), the
    /// fields are read straight from the carrier with no allocation for absent fields and no
    /// `Vec` per lookup; with any other propagator, the same as `extract_parts`. The result is
    /// the same either way, but for values that are not text (see
    /// [`FieldValues`]).
    ///
    /// ```
    /// use contextflow_otel::{carrier::{FieldValues, Pairs}, Propagation};
    /// use opentelemetry::{propagation::Extractor, trace::TraceContextExt, Context};
    ///
    /// struct Headers<'a>(Pairs<'a>);
    /// impl Extractor for Headers<'_> {
    ///     fn get(&self, key: &str) -> Option<&str> { self.0.get(key) }
    ///     fn keys(&self) -> Vec<&str> { self.0.keys() }
    ///     fn get_all(&self, key: &str) -> Option<Vec<&str>> { self.0.get_all(key) }
    /// }
    /// impl FieldValues for Headers<'_> {
    ///     fn field_values<'s>(&'s self, key: &str) -> impl Iterator<Item = &'s [u8]> {
    ///         self.0.get_all(key).unwrap_or_default().into_iter().map(str::as_bytes)
    ///     }
    /// }
    /// let headers = Headers(Pairs::new([
    ///     ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ///     ("x-request-id", "r-7"),
    /// ]));
    /// let (cx, id) = Propagation::global().extract_parts_from(&Context::new(), &headers);
    /// assert!(cx.span().span_context().is_remote());
    /// assert_eq!(id.as_str(), "r-7");
    /// ```
    pub fn extract_parts_from<E: FieldValues>(
        &self,
        cx: &Context,
        carrier: &E,
    ) -> (Context, RequestId) {
        let fast = match &self.trace {
            Some(_) => self.trace_context_only,
            None => opentelemetry::global::get_text_map_propagator(|p| p.fields().next().is_none()),
        };
        if !fast {
            return self.extract_parts(cx, carrier);
        }
        // One pass over the carrier where it can (a header map), else a lookup per field.
        match ScannedFields::scan(carrier, [TRACEPARENT, TRACESTATE, BAGGAGE, X_REQUEST_ID]) {
            Some(source) => self.extract_from_source(cx, &source),
            None => self.extract_from_source(cx, &BoundedFields(carrier)),
        }
    }

    /// The fast path of [`extract_parts_from`](Self::extract_parts_from) over any [`Source`].
    fn extract_from_source(&self, cx: &Context, source: &impl Source) -> (Context, RequestId) {
        let cx = extract_trace_context(cx, source);
        let cx = if self.trace.is_none() {
            extract_baggage(&cx, source)
        } else {
            cx
        };
        let id = extract_request_id(source);
        (agreeing(cx, &id), id)
    }

    /// Reads only what the trace propagator carries (no request id).
    fn extract_trace(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        match &self.trace {
            Some(p) => p.extract_with_context(cx, extractor),
            None => opentelemetry::global::get_text_map_propagator(|p| {
                if p.fields().next().is_none() {
                    // The fallback's two propagators, called directly.
                    let cx = TraceContextPropagator::new().extract_with_context(cx, extractor);
                    BaggagePropagator::new().extract_with_context(&cx, extractor)
                } else {
                    p.extract_with_context(cx, extractor)
                }
            }),
        }
    }

    /// Writes `cx` and the request id into `injector`.
    ///
    /// ```
    /// use contextflow_otel::{Propagation, RequestId};
    /// use opentelemetry::Context;
    /// use std::collections::HashMap;
    ///
    /// let cx = Context::new().with_value("r-4".parse::<RequestId>()?);
    /// let mut out = HashMap::new();
    /// Propagation::global().inject(&cx, &mut out);
    /// assert_eq!(out["x-request-id"], "r-4");
    /// # Ok::<(), contextflow_otel::InvalidRequestId>(())
    /// ```
    pub fn inject(&self, cx: &Context, injector: &mut dyn Injector) {
        // The request id is written once, below: a trace propagator that writes it too
        // (`default_propagator()` installed as the global one) would make a carrier that
        // appends (Kafka headers, stream fields, MQTT user properties) carry it twice, which
        // the receiving side rejects as a repeated id.
        let mut trace_fields = WithoutRequestId(injector);
        match &self.trace {
            Some(p) => p.inject_context(cx, &mut trace_fields),
            None => opentelemetry::global::get_text_map_propagator(|p| {
                if p.fields().next().is_none() {
                    FALLBACK.inject_context(cx, &mut trace_fields)
                } else {
                    p.inject_context(cx, &mut trace_fields)
                }
            }),
        }
        RequestIdPropagator::new().inject_context(cx, injector);
    }

    /// The fields the trace propagator writes, plus `x-request-id`.
    ///
    /// ```
    /// let fields = contextflow_otel::Propagation::global().fields();
    /// assert!(fields.iter().any(|f| f == "x-request-id"));
    /// ```
    pub fn fields(&self) -> Vec<String> {
        let mut fields: Vec<String> = match &self.trace {
            Some(p) => p.fields().map(str::to_owned).collect(),
            None => opentelemetry::global::get_text_map_propagator(|p| {
                let fields: Vec<String> = p.fields().map(str::to_owned).collect();
                if fields.is_empty() {
                    FALLBACK.fields().map(str::to_owned).collect()
                } else {
                    fields
                }
            }),
        };
        // Header names are case-insensitive: `X-Request-ID` listed by a propagator is ours.
        if !fields.iter().any(|f| f.eq_ignore_ascii_case(X_REQUEST_ID)) {
            fields.push(X_REQUEST_ID.to_owned());
        }
        fields
    }
}
