//! The trace model of contextflow: OpenTelemetry's [`Context`] carried in contextflow's frame
//! and across contextflow spawns; the propagators that decide what crosses a process boundary
//! (W3C trace context, W3C baggage, the request id); and the carrier abstraction transports
//! use to read and write them.
//!
//! The trace in the frame *is* OpenTelemetry's: one model, so spans of every library
//! (the OpenTelemetry SDK, `tracing-opentelemetry`, contextflow's HTTP and gRPC layers) join
//! one connected trace, with no glue.
//!
//! - [`scope`] / [`sync_scope`] run code inside a `Context`, both as OpenTelemetry's current
//!   context (attached on every poll, replacing the caller's) and as contextflow variables
//!   ([`OTEL_CONTEXT`], and [`REQUEST_ID`] when the context holds a [`RequestId`]) layered
//!   over the frame of whoever polls (or calls) them, so other variables bound outside stay
//!   visible, the context is visible to [`Snapshot`]s and can be a log field.
//! - [`carry_context`] registers [`ContextCarrier`], so that `contextflow::spawn`,
//!   `spawn_blocking`, `contextflow::thread::spawn` and `in_current_context` capture
//!   [`Context::current`] and attach it around every poll of the child.
//! - Propagation ([`propagation`]): [`TraceContextPropagator`], [`BaggagePropagator`] and
//!   [`RequestIdPropagator`] are OpenTelemetry `TextMapPropagator`s, composable with B3,
//!   Jaeger or Datadog ones; [`Propagation`] is what transports use (the global propagator by
//!   default); [`extract`] and [`inject`] are the one-line forms.
//! - Carriers ([`carrier`]): [`carrier::Pairs`] and [`carrier::InjectFn`] make any
//!   string-keyed metadata (message headers, an environment) an `Extractor` or `Injector`.
//! - [`current_trace_id`], [`current_span_id`], [`current_request_id`] read the innermost
//!   context; ids come from a cryptographically secure generator ([`new_trace_id`],
//!   [`RequestId::new`], and [`SecureIdGenerator`] for the SDK with feature `sdk`).
//!
//! ```
//! use contextflow_otel::carrier::Pairs;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! contextflow_otel::carry_context();
//!
//! // What arrives with a message or a request:
//! let cx = contextflow_otel::extract(&Pairs::new([
//!     ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
//!     ("x-request-id", "req-1"),
//! ]));
//! contextflow_otel::scope(cx, async {
//!     let trace_id = contextflow_otel::current_trace_id().unwrap();
//!     assert_eq!(trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
//!     // Spawned children see it too, with no `.with_current_context()`.
//!     let child = contextflow::spawn(async {
//!         (contextflow_otel::current_trace_id(), contextflow_otel::current_request_id())
//!     });
//!     let (child_trace, child_request) = child.await.unwrap();
//!     assert_eq!(child_trace, Some(trace_id));
//!     assert_eq!(child_request.unwrap().as_str(), "req-1");
//! })
//! .await;
//! assert_eq!(contextflow_otel::current_trace_id(), None);
//! # }
//! ```
//!
//! # Trace id in every log line
//!
//! [`OTEL_CONTEXT`] holds an [`OtelContext`] whose `Display` is the trace id, and
//! [`REQUEST_ID`] a [`RequestId`], so both can be log fields with `contextflow-tracing`
//! (`ContextFields::new().field("trace_id", &contextflow_otel::OTEL_CONTEXT)`).
//!
//! # With `tracing-opentelemetry`
//!
//! `tracing-opentelemetry` starts a root tracing span under `Context::current()`; inside
//! [`scope`] (and in children spawned through contextflow with the carrier registered) that is
//! the request's context, so tracing spans join the request's trace. With its default context
//! activation, entering a tracing span makes its OpenTelemetry context current, so
//! [`current_span_id`], and the client layers' `parent-id`, are that span's.
//!
//! # Cost
//!
//! With the carrier registered, each contextflow spawn clones the current `Context` (two
//! reference counts) and each poll of the child attaches it (OpenTelemetry's own cost,
//! as with `with_context`). Nothing is done for spawns when the carrier is not registered.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

pub mod baggage;
pub mod carrier;
mod ids;
pub mod propagation;
pub mod request_id;
pub mod traceparent;
pub mod tracestate;

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{self, Poll},
};

use contextflow::{
    carry::{self, Carrier},
    AsyncLocal, Snapshot,
};
use opentelemetry::{
    trace::{SpanContext, SpanId, TraceContextExt, TraceId},
    Context,
};
use pin_project_lite::pin_project;

#[cfg(feature = "sdk")]
pub use crate::ids::SecureIdGenerator;
pub use crate::{
    baggage::{Baggage, BaggageMember, InvalidBaggage, BAGGAGE},
    ids::{new_span_id, new_trace_id, reseed_after_fork},
    propagation::{
        default_propagator, extract, inject, BaggagePropagator, Propagation, RequestIdPropagator,
        TraceContextPropagator,
    },
    request_id::{InvalidRequestId, RequestId, X_REQUEST_ID},
    traceparent::{InvalidTraceParent, TraceParent, RANDOM_TRACE_ID, TRACEPARENT},
    tracestate::{InvalidTraceState, TraceState, TRACESTATE},
};

/// The request's OpenTelemetry context as a contextflow variable; set by [`scope`],
/// [`sync_scope`], [`in_remote_context`] and the server layers. Its value displays as the
/// trace id, so it can be a log field. Marked [`Inherit::Everywhere`](contextflow::Inherit::Everywhere):
/// the trace also follows a plain `tokio::spawn` on a runtime with contextflow's hooks.
///
/// ```
/// use opentelemetry::{trace::TraceContextExt, Context};
/// # use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
/// # let parent = SpanContext::new(TraceId::from(7u128), SpanId::from(1u64),
/// #     TraceFlags::SAMPLED, true, TraceState::default());
///
/// let cx = Context::new().with_remote_span_context(parent);
/// contextflow_otel::sync_scope(cx, || {
///     let shown = contextflow_otel::OTEL_CONTEXT.with(|cx| cx.map(|cx| cx.to_string()));
///     assert_eq!(shown.as_deref(), Some("00000000000000000000000000000007"));
/// });
/// ```
pub static OTEL_CONTEXT: AsyncLocal<OtelContext> =
    AsyncLocal::named("otel.context").inherit(contextflow::Inherit::Everywhere);

/// The request id of the current request; set by [`scope`] and [`sync_scope`] from a context
/// holding a [`RequestId`] (as [`extract`] makes), and by the server layers. Marked
/// [`Inherit::Everywhere`](contextflow::Inherit::Everywhere): it also follows a plain `tokio::spawn` on a
/// runtime with contextflow's hooks.
///
/// ```
/// use contextflow_otel::{RequestId, REQUEST_ID};
///
/// let id: RequestId = "req-1".parse()?;
/// REQUEST_ID.sync_scope(id, || {
///     assert_eq!(contextflow_otel::current_request_id().unwrap().as_str(), "req-1");
/// });
/// # Ok::<(), contextflow_otel::InvalidRequestId>(())
/// ```
pub static REQUEST_ID: AsyncLocal<RequestId> =
    AsyncLocal::named("request_id").inherit(contextflow::Inherit::Everywhere);

/// An OpenTelemetry [`Context`] stored in [`OTEL_CONTEXT`]; displays as its span's trace id
/// (32 hex digits; nothing when the context has no valid span).
///
/// ```
/// use opentelemetry::Context;
/// let cx = contextflow_otel::OtelContext::new(Context::new());
/// assert_eq!(cx.trace_id(), None);
/// assert_eq!(cx.to_string(), "");
/// ```
#[derive(Clone)]
pub struct OtelContext {
    cx: Context,
}

pin_project! {
    /// The future returned by [`scope`] and [`in_remote_context`]: `Send` when `F` is, and
    /// nameable, for middleware that stores it in a response future. On every poll, and while
    /// the inner future is dropped, it attaches its `Context` as OpenTelemetry's current one and
    /// binds the context's variables *over the frame of whoever polls it*, so a binding made
    /// outside (by an outer middleware around this future) stays visible inside.
    ///
    /// ```
    /// use contextflow_otel::OtelScope;
    /// use std::future::Ready;
    ///
    /// struct ResponseFuture {
    ///     inner: OtelScope<Ready<u16>>,
    /// }
    /// let f = ResponseFuture {
    ///     inner: contextflow_otel::scope(opentelemetry::Context::new(), std::future::ready(200)),
    /// };
    /// fn assert_send<T: Send>(_: &T) {}
    /// assert_send(&f.inner);
    /// ```
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct OtelScope<F> {
        // `None` once done: `Drop` drops an unfinished future inside the context.
        #[pin]
        inner: Option<F>,
        cx: Context,
        request_id: Option<RequestId>,
    }

    impl<F> PinnedDrop for OtelScope<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let mut inner = this.inner;
            if inner.is_some() {
                enter(this.cx, this.request_id.as_ref(), || inner.set(None));
            }
        }
    }
}

/// A [`Carrier`] for OpenTelemetry's current [`Context`]: contextflow spawns capture
/// [`Context::current`] and attach it around every poll of the child. Register it with
/// [`carry_context`].
///
/// ```
/// use contextflow::carry::Carrier;
/// use opentelemetry::{trace::TraceContextExt as _, Context};
/// # use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
/// # let remote = SpanContext::new(TraceId::from(3u128), SpanId::from(4u64),
/// #     TraceFlags::SAMPLED, true, TraceState::default());
/// let carrier = contextflow_otel::ContextCarrier;
/// // What a spawn inside a request captures, and what the child then sees.
/// let captured = contextflow_otel::sync_scope(Context::new().with_remote_span_context(remote), || {
///     carrier.capture().unwrap()
/// });
/// let mut seen = None;
/// carrier.enter(&captured, &mut || seen = Some(contextflow_otel::current_trace_id()));
/// assert_eq!(seen, Some(Some(TraceId::from(3u128))));
/// assert_eq!(contextflow_otel::current_trace_id(), None, "restored afterwards");
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct ContextCarrier;

// ===== impl OtelContext =====

impl OtelContext {
    /// Wraps `cx`.
    ///
    /// ```
    /// use opentelemetry::{trace::{SpanContext, TraceContextExt as _}, Context};
    /// # use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};
    /// # let remote = SpanContext::new(TraceId::from(3u128), SpanId::from(4u64),
    /// #     TraceFlags::SAMPLED, true, TraceState::default());
    /// let cx = contextflow_otel::OtelContext::new(Context::new().with_remote_span_context(remote));
    /// assert_eq!(cx.trace_id(), Some(TraceId::from(3u128)));
    /// assert_eq!(cx.span_id(), Some(SpanId::from(4u64)));
    /// ```
    pub fn new(cx: Context) -> Self {
        OtelContext { cx }
    }

    /// The wrapped context.
    ///
    /// ```
    /// use opentelemetry::trace::TraceContextExt;
    /// let cx = contextflow_otel::OtelContext::new(opentelemetry::Context::new());
    /// assert!(!cx.context().has_active_span());
    /// ```
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// The trace id of the context's span, if it has a valid one.
    ///
    /// ```
    /// let cx = contextflow_otel::OtelContext::new(opentelemetry::Context::new());
    /// assert_eq!(cx.trace_id(), None);
    /// ```
    pub fn trace_id(&self) -> Option<TraceId> {
        valid(self.cx.span().span_context()).map(SpanContext::trace_id)
    }

    /// The id of the context's span, if it has a valid one.
    ///
    /// ```
    /// let cx = contextflow_otel::OtelContext::new(opentelemetry::Context::new());
    /// assert_eq!(cx.span_id(), None);
    /// ```
    pub fn span_id(&self) -> Option<SpanId> {
        valid(self.cx.span().span_context()).map(SpanContext::span_id)
    }

    /// Unwraps the context.
    ///
    /// ```
    /// use opentelemetry::{baggage::BaggageExt as _, Context, KeyValue};
    /// let cx = Context::new().with_baggage([KeyValue::new("k", "v")]);
    /// let back = contextflow_otel::OtelContext::new(cx).into_context();
    /// assert_eq!(back.baggage().get("k").map(|v| v.as_str()), Some("v"));
    /// ```
    pub fn into_context(self) -> Context {
        self.cx
    }
}

/// The trace id of the context's span; nothing when it has no valid span (an all-zero id
/// would put every untraced request's log lines under one trace id). As a context field of
/// `contextflow-tracing`, a value that writes nothing is left out of the line.
///
/// ```
/// use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
/// let none = contextflow_otel::OtelContext::new(opentelemetry::Context::new());
/// assert_eq!(none.to_string(), "");
/// let sc = SpanContext::new(TraceId::from(1u128), SpanId::from(2u64), TraceFlags::SAMPLED, true, TraceState::default());
/// let traced = contextflow_otel::OtelContext::new(opentelemetry::Context::new().with_remote_span_context(sc));
/// assert_eq!(traced.to_string(), "00000000000000000000000000000001");
/// ```
impl fmt::Display for OtelContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.trace_id() {
            Some(trace_id) => fmt::Display::fmt(&trace_id, f),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for OtelContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("OtelContext").field(&self.cx).finish()
    }
}

impl From<Context> for OtelContext {
    fn from(cx: Context) -> Self {
        OtelContext::new(cx)
    }
}

// ===== impl ContextCarrier =====

impl Carrier for ContextCarrier {
    type Value = Context;

    fn capture(&self) -> Option<Context> {
        // Always carried: a `Context` may hold baggage or custom values without a span, and
        // OpenTelemetry has no public way to tell an empty one apart.
        Some(Context::current())
    }

    fn enter(&self, cx: &Context, f: &mut dyn FnMut()) {
        // The guard detaches on drop, also when `f` panics.
        let _attached = cx.clone().attach();
        f()
    }

    fn enter_none(&self, f: &mut dyn FnMut()) {
        // A snapshot that carries no `Context` (an empty one, or one made under
        // `suppress_flow`) replaces the thread's: an empty `Context`, not the trace of whatever
        // the polling thread was doing. Telemetry suppressed there (an exporter's own work)
        // stays suppressed.
        let empty = if Context::is_current_telemetry_suppressed() {
            Context::new().with_telemetry_suppressed()
        } else {
            Context::new()
        };
        let _attached = empty.attach();
        f()
    }

    /// Inside the other carriers: entering a tracing span (`contextflow-tracing`'s carrier)
    /// with `tracing-opentelemetry`'s context activation attaches the span's own context,
    /// which must not replace the one captured at the spawn.
    fn innermost(&self) -> bool {
        true
    }
}

/// Registers [`ContextCarrier`] for the rest of the process; returns `false` if it already
/// was. Safe to call any number of times.
///
/// ```
/// contextflow_otel::carry_context();
/// assert!(!contextflow_otel::carry_context());
/// ```
pub fn carry_context() -> bool {
    carry::register(ContextCarrier)
}

// ===== impl OtelScope =====

impl<F: Future> Future for OtelScope<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, task: &mut task::Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut inner = this.inner;
        enter(this.cx, this.request_id.as_ref(), || {
            let Some(fut) = inner.as_mut().as_pin_mut() else {
                panic!("`OtelScope` polled after completion");
            };
            let poll = fut.poll(task);
            if poll.is_ready() {
                // Done: drop the inner future now, inside the context.
                inner.set(None);
            }
            poll
        })
    }
}

impl<F> fmt::Debug for OtelScope<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtelScope")
            .field("cx", &self.cx)
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

// ===== scopes =====

/// Runs `fut` inside `cx`: attached as OpenTelemetry's current context around every poll, and
/// bound to [`OTEL_CONTEXT`] (and to [`REQUEST_ID`] when `cx` holds a [`RequestId`]) on top
/// of the frame of whoever polls it: it *layers*, so a variable bound around the returned
/// future (by an outer middleware, say) stays visible inside. The OpenTelemetry context
/// itself is replaced by `cx` (that is what makes spans started inside its children).
///
/// ```
/// use opentelemetry::{Context, KeyValue, baggage::BaggageExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let cx = Context::new().with_baggage([KeyValue::new("tenant", "acme")]);
/// let tenant = contextflow_otel::scope(cx, async {
///     Context::current().baggage().get("tenant").map(|v| v.to_string())
/// })
/// .await;
/// assert_eq!(tenant.as_deref(), Some("acme"));
/// # }
/// ```
pub fn scope<F: Future>(cx: Context, fut: F) -> OtelScope<F> {
    OtelScope {
        request_id: cx.get::<RequestId>().cloned(),
        cx,
        inner: Some(fut),
    }
}

/// Runs `f` with `cx` attached and [`OTEL_CONTEXT`] (and [`REQUEST_ID`], when given) bound
/// over the current frame.
fn enter<R>(cx: &Context, request_id: Option<&RequestId>, f: impl FnOnce() -> R) -> R {
    let attached = || {
        // The guard detaches on drop, also when `f` panics.
        let _attached = cx.clone().attach();
        f()
    };
    OTEL_CONTEXT.sync_scope(OtelContext::new(cx.clone()), || match request_id {
        Some(id) => REQUEST_ID.sync_scope(id.clone(), attached),
        None => attached(),
    })
}

/// Runs `f` with [`OTEL_CONTEXT`] (and [`REQUEST_ID`], when `cx` holds one) bound to `cx`'s.
/// The OpenTelemetry context itself is not attached.
pub(crate) fn bind<R>(cx: &Context, f: impl FnOnce() -> R) -> R {
    OTEL_CONTEXT.sync_scope(OtelContext::new(cx.clone()), || {
        match cx.get::<RequestId>() {
            Some(id) => REQUEST_ID.sync_scope(id.clone(), f),
            None => f(),
        }
    })
}

/// A [`Snapshot`] of the current frame with `cx` bound as by [`scope`]. With
/// [`carry_context`] registered, the snapshot also carries `cx` as OpenTelemetry's current
/// context (captured with `cx` attached for the moment of the capture): code run in it
/// ([`Snapshot::run`], [`contextflow::spawn_with`]) sees `cx`, not whatever context was
/// current where the snapshot was made. Without it, attach `cx` inside the snapshot's `run`.
///
/// ```
/// use contextflow_otel::{carrier::Pairs, REQUEST_ID};
/// use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
///
/// contextflow_otel::carry_context();
/// let parent = SpanContext::new(TraceId::from(5u128), SpanId::from(6u64), TraceFlags::SAMPLED, true, TraceState::default());
/// let cx = contextflow_otel::extract(&Pairs::new([("x-request-id", "r-5")])).with_remote_span_context(parent);
/// let snapshot = contextflow_otel::snapshot_with(&cx);
/// assert_eq!(snapshot.get(&REQUEST_ID).unwrap().as_str(), "r-5");
/// // Made where another context is current: `cx` is what runs in it.
/// let other = SpanContext::new(TraceId::from(7u128), SpanId::from(8u64), TraceFlags::SAMPLED, true, TraceState::default());
/// let _elsewhere = opentelemetry::Context::new().with_remote_span_context(other).attach();
/// let snapshot = contextflow_otel::snapshot_with(&cx);
/// assert_eq!(snapshot.run(contextflow_otel::current_trace_id), Some(TraceId::from(5u128)));
/// ```
pub fn snapshot_with(cx: &Context) -> Snapshot {
    let _attached = cx.clone().attach();
    bind(cx, Snapshot::capture)
}

/// A [`Snapshot`] of the current frame with [`OTEL_CONTEXT`] bound to `cx` and [`REQUEST_ID`]
/// to `request_id` (what a server layer binds for a request); like [`snapshot_with`], it
/// carries `cx` as OpenTelemetry's current context when [`carry_context`] is registered.
///
/// ```
/// use contextflow_otel::{RequestId, REQUEST_ID};
/// let id: RequestId = "r-7".parse()?;
/// let snapshot = contextflow_otel::snapshot_with_request(&opentelemetry::Context::new(), id);
/// assert_eq!(snapshot.get(&REQUEST_ID).unwrap().as_str(), "r-7");
/// # Ok::<(), contextflow_otel::InvalidRequestId>(())
/// ```
pub fn snapshot_with_request(cx: &Context, request_id: RequestId) -> Snapshot {
    // As in `snapshot_with`: a carried OpenTelemetry context is `cx`, not the caller's.
    let _attached = cx.clone().attach();
    OTEL_CONTEXT.sync_scope(OtelContext::new(cx.clone()), || {
        REQUEST_ID.sync_scope(request_id, Snapshot::capture)
    })
}

/// Runs `f` inside `cx`: attached as OpenTelemetry's current context and bound to
/// [`OTEL_CONTEXT`] (and [`REQUEST_ID`] when `cx` holds one), all restored when `f` returns or
/// panics.
///
/// ```
/// use opentelemetry::{Context, trace::TraceContextExt};
/// # use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
/// # let parent = SpanContext::new(TraceId::from(9u128), SpanId::from(2u64),
/// #     TraceFlags::SAMPLED, true, TraceState::default());
///
/// let cx = Context::new().with_remote_span_context(parent);
/// let id = contextflow_otel::sync_scope(cx, contextflow_otel::current_span_id);
/// assert_eq!(id, Some(2u64.into()));
/// ```
pub fn sync_scope<R>(cx: Context, f: impl FnOnce() -> R) -> R {
    bind(&cx.clone(), || {
        let _attached = cx.attach();
        f()
    })
}

/// The context a request continuing the remote trace `parent` runs in: the current context
/// (keeping its baggage) with `parent` as its remote span.
///
/// ```
/// use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
/// let parent = SpanContext::new(TraceId::from(5u128), SpanId::from(6u64),
///     TraceFlags::SAMPLED, true, TraceState::default());
/// let cx = contextflow_otel::remote_context(parent.clone());
/// assert_eq!(cx.span().span_context(), &parent);
/// ```
pub fn remote_context(parent: SpanContext) -> Context {
    Context::map_current(|cx| cx.with_remote_span_context(parent))
}

/// Runs `fut` as a request continuing the remote trace `parent` (extracted from incoming
/// headers): spans started inside are children of `parent`. Same as
/// `scope(remote_context(parent), fut)`.
///
/// ```
/// use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let parent = SpanContext::new(TraceId::from(5u128), SpanId::from(6u64),
///     TraceFlags::SAMPLED, true, TraceState::default());
/// let ids = contextflow_otel::in_remote_context(parent, async {
///     (contextflow_otel::current_trace_id(), contextflow_otel::current_span_id())
/// })
/// .await;
/// assert_eq!(ids, (Some(5u128.into()), Some(6u64.into())));
/// # }
/// ```
pub fn in_remote_context<F: Future>(parent: SpanContext, fut: F) -> OtelScope<F> {
    scope(remote_context(parent), fut)
}

// ===== accessors =====

/// The innermost OpenTelemetry context: [`Context::current`] when it has a span (a span
/// started or a tracing span entered inside the request is more specific than the request),
/// else the request's context from [`OTEL_CONTEXT`] (for code that runs in contextflow's
/// frame without OpenTelemetry's thread-local, such as `Snapshot::run` with no carrier
/// registered), else `Context::current()`.
///
/// So a context attached with OpenTelemetry's own `attach` on top of the request's is seen
/// only when it has a span: without one, contextflow cannot tell it from a thread-local left
/// over by other code. One thing of it is always kept: a suppression of telemetry
/// (`Context::enter_telemetry_suppressed_scope`, what the SDK's processors do around an
/// export) makes the returned context suppressed too. To change what goes out of a request without a span (baggage cleared
/// before a call to a third party, or added), run the call in [`sync_scope`] or [`scope`]
/// with the new context, which sets both:
///
/// ```
/// use opentelemetry::baggage::BaggageExt as _;
/// use contextflow_otel::carrier::Pairs;
///
/// let incoming = contextflow_otel::extract(&Pairs::new([("baggage", "user=alice")]));
/// contextflow_otel::sync_scope(incoming, || {
///     let cleared = contextflow_otel::current_context().with_cleared_baggage();
///     contextflow_otel::sync_scope(cleared, || {
///         assert_eq!(contextflow_otel::current_context().baggage().len(), 0);
///     });
///     assert_eq!(contextflow_otel::current_context().baggage().len(), 1);
/// });
/// ```
///
/// ```
/// use opentelemetry::trace::TraceContextExt;
/// assert!(!contextflow_otel::current_context().has_active_span());
/// ```
pub fn current_context() -> Context {
    let cx = match Context::map_current(|cx| cx.has_active_span().then(|| cx.clone())) {
        Some(cx) => cx,
        None => match OTEL_CONTEXT.with(|cx| cx.map(|cx| cx.cx.clone())) {
            // Telemetry suppressed on this thread (the SDK's own work: an exporter's call)
            // stays suppressed in the request's context: a span parented on it is not
            // recorded.
            Some(cx) if Context::is_current_telemetry_suppressed() => {
                cx.with_telemetry_suppressed()
            }
            Some(cx) => cx,
            None => Context::current(),
        },
    };
    // The innermost request id wins: a context that carries one (a cron run's, a consumed
    // message's) may have a `REQUEST_ID` binding made inside it, for one piece of its work.
    REQUEST_ID.with(move |id| match id {
        Some(id) if cx.get::<RequestId>().is_some_and(|held| held != id) => {
            cx.with_value(id.clone())
        }
        _ => cx,
    })
}

/// The current request id, if one is set.
///
/// ```
/// assert!(contextflow_otel::current_request_id().is_none());
/// ```
pub fn current_request_id() -> Option<RequestId> {
    REQUEST_ID.get()
}

/// The trace id of the innermost valid span (see [`current_context`]); `None` outside any
/// trace.
///
/// ```
/// assert_eq!(contextflow_otel::current_trace_id(), None);
/// ```
pub fn current_trace_id() -> Option<TraceId> {
    with_current_span_context(SpanContext::trace_id)
}

/// The id of the innermost valid span (see [`current_context`]): the remote parent inside
/// [`in_remote_context`], or a span started inside the request; `None` outside any trace.
///
/// ```
/// assert_eq!(contextflow_otel::current_span_id(), None);
/// ```
pub fn current_span_id() -> Option<SpanId> {
    with_current_span_context(SpanContext::span_id)
}

// ===== helpers =====

fn valid(sc: &SpanContext) -> Option<&SpanContext> {
    sc.is_valid().then_some(sc)
}

/// Reads the innermost valid span context without cloning a `Context`.
fn with_current_span_context<R>(f: impl Fn(&SpanContext) -> R) -> Option<R> {
    if let Some(r) = Context::map_current(|cx| valid(cx.span().span_context()).map(&f)) {
        return Some(r);
    }
    OTEL_CONTEXT.with(|cx| cx.and_then(|cx| valid(cx.cx.span().span_context()).map(&f)))
}
