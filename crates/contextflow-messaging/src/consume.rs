//! The consume side, shared by every transport: each message's handler runs in a scope of its
//! own: the trace and request id from the message's metadata and nothing else, over the frame
//! of whoever polls it (start the consumer loop from an empty context, or
//! [`isolate`](Consumer::isolate) the tenant and the user, so that the loop's never reach a
//! message).
//!
//! For each message, a [`Consumer`]:
//!
//! 1. extracts the producer's context from the metadata with the configured propagation
//!    (OpenTelemetry's global propagator by default): trace context, baggage, and the request
//!    id, or a fresh request id when the message has none or a malformed one. The base is an
//!    empty OpenTelemetry context: nothing of the consumer loop's own trace or baggage leaks
//!    into a message;
//! 2. with a tracer (the global provider's by default, found even when the SDK is installed
//!    after the consumer is made; none without an SDK), starts a
//!    `process` consumer span that is a child of the producer's span, as the OpenTelemetry
//!    messaging conventions allow for a consumer that processes one message at a time; a
//!    batch ([`Consumer::batch_scope`]) gets a new root span with a link to each message's
//!    context instead;
//! 3. runs the handler, every poll of it and its drop in that context: OpenTelemetry's
//!    current context (replaced) and contextflow's `OTEL_CONTEXT` and `REQUEST_ID` (and a
//!    trusted consumer's [`Bindings`]), layered over the frame of whoever polls the handler's
//!    future, so a variable the consumer loop (or a wrapper) binds around it stays visible;
//! 4. ends the span when the handler finishes (with `error.type = "cancelled"` when it is
//!    dropped first, `"panic"` when it panicked).
//!
//! Metadata is untrusted: values are bounded and validated by `contextflow-otel` (a malformed
//! one is dropped with a `debug` log), and nothing read from a message ever panics.
//!
//! ```
//! use contextflow_messaging::Consumer;
//! use contextflow_otel::carrier::Pairs;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let consumer = Consumer::new().system("rabbitmq").destination("orders");
//! // The headers of a message, as the transport gives them.
//! let headers = [
//!     ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
//!     ("x-request-id", "order-17"),
//! ];
//! let seen = consumer
//!     .scope(&Pairs::new(headers), async {
//!         let request_id = contextflow_otel::current_request_id().unwrap();
//!         let trace_id = contextflow_otel::current_trace_id().unwrap();
//!         (request_id.to_string(), trace_id.to_string())
//!     })
//!     .await;
//! assert_eq!(seen.0, "order-17");
//! assert_eq!(seen.1, "4bf92f3577b34da6a3ce929d0e0e4736");
//! assert!(contextflow_otel::current_request_id().is_none(), "only inside the handler");
//! # }
//! ```
//!
//! # Tenant and user
//!
//! A message never sets the tenant or the user: anyone who can publish to the queue could
//! otherwise act as any tenant. By default the handler gets neither from the message (and,
//! with [`Consumer::isolate`] or a loop started from an empty context, none from the loop
//! either), and finds them the way the application's authenticated code does (from the order
//! it loads, for example):
//!
//! ```
//! use contextflow::AsyncLocal;
//! use contextflow_messaging::Consumer;
//! use contextflow_otel::carrier::Pairs;
//!
//! static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let consumer = Consumer::new();
//! let metadata = Pairs::new([("x-tenant", "acme")]); // anyone could have written this
//! let tenant = consumer.scope(&metadata, async { TENANT.get() }).await;
//! assert_eq!(tenant, None);
//! # }
//! ```
//!
//! A consumer of a trusted queue opts in explicitly with [`Consumer::trust`]: a closure that
//! verifies the metadata (a signature, a trusted internal queue...) and returns the
//! [`Bindings`] to add, or `None` to add nothing:
//!
//! ```
//! use contextflow::AsyncLocal;
//! use contextflow_messaging::{Bindings, Consumer};
//! use contextflow_otel::carrier::Pairs;
//! use opentelemetry::propagation::Extractor;
//!
//! static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");
//!
//! fn verified_tenant(metadata: &dyn Extractor) -> Option<String> {
//!     // A real application checks an HMAC or a signed token here.
//!     let tenant = metadata.get("x-tenant")?;
//!     (metadata.get("x-tenant-signature")? == format!("signed:{tenant}")).then(|| tenant.to_owned())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let consumer = Consumer::new().trust(|metadata| {
//!     let tenant = verified_tenant(metadata)?;
//!     Some(Bindings::new().bind(&TENANT, tenant))
//! });
//! let signed = Pairs::new([("x-tenant", "acme"), ("x-tenant-signature", "signed:acme")]);
//! assert_eq!(consumer.scope(&signed, async { TENANT.get() }).await.as_deref(), Some("acme"));
//! let forged = Pairs::new([("x-tenant", "acme"), ("x-tenant-signature", "nope")]);
//! assert_eq!(consumer.scope(&forged, async { TENANT.get() }).await, None);
//! # }
//! ```

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context as TaskContext, Poll},
};

use contextflow::{AsyncLocal, Snapshot};
use contextflow_otel::{Propagation, RequestId};
use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::TraceContextExt as _,
    Context,
};
use pin_project_lite::pin_project;

use crate::spans::{self, SpanInfo, Spans};

/// The verifying closure of [`Consumer::trust`].
type TrustFn = dyn Fn(&dyn Extractor) -> Option<Bindings> + Send + Sync;

/// Runs consumed messages in their own context; one per queue or subscription, cheap to clone.
///
/// ```
/// use contextflow_messaging::Consumer;
/// use contextflow_otel::carrier::Pairs;
///
/// let consumer = Consumer::new().destination("audit");
/// // Synchronous handlers use `run`.
/// let id = consumer.run(&Pairs::new([("x-request-id", "r-1")]), contextflow_otel::current_request_id);
/// assert_eq!(id.unwrap().as_str(), "r-1");
/// ```
#[derive(Clone)]
pub struct Consumer {
    propagation: Propagation,
    spans: Spans,
    system: Option<&'static str>,
    destination: Option<Arc<str>>,
    trust: Option<Arc<TrustFn>>,
    /// Variables unset for every handler ([`Consumer::isolate`]).
    isolated: Arc<Bindings>,
}

/// The context one message (or one batch) is handled in: the extracted OpenTelemetry context
/// (with the consumer span, when one was started), the request id, and the contextflow frame.
///
/// ```
/// use contextflow_messaging::Consumer;
/// use contextflow_otel::carrier::Pairs;
///
/// let message = Consumer::new().context(&Pairs::new([("x-request-id", "r-2")]));
/// assert_eq!(message.request_id().as_str(), "r-2");
/// assert_eq!(message.run(|| contextflow_otel::current_request_id()).unwrap().as_str(), "r-2");
/// ```
pub struct MessageContext {
    cx: Context,
    request_id: RequestId,
    /// The consumer's [`isolate`](Consumer::isolate)d variables, unset first.
    isolated: Arc<Bindings>,
    /// What a trusted consumer's `verify` returned: bound inside the request id.
    trusted: Bindings,
    owns_span: bool,
    /// Set once the consumer span has been ended (by `finish`, the future, or `Drop`).
    ended: AtomicBool,
}

/// Bindings of the application's own variables (the tenant, the user) that a trusted consumer
/// adds to a message's context; see [`Consumer::trust`].
///
/// ```
/// use contextflow::AsyncLocal;
/// use contextflow_messaging::Bindings;
///
/// static USER: AsyncLocal<u64> = AsyncLocal::named("user");
/// let bindings = Bindings::new().bind(&USER, 42);
/// assert_eq!(bindings.len(), 1);
/// ```
#[derive(Default, Clone)]
pub struct Bindings {
    binds: Vec<Arc<BindFn>>,
}

/// One binding: runs its argument with the variable bound (to a clone of the value) over the
/// current frame.
type BindFn = dyn Fn(&mut dyn FnMut()) + Send + Sync;

pin_project! {
    /// The future returned by [`Consumer::scope`] and [`MessageContext::scope`]: runs the
    /// handler, each poll and its drop, in the message's context, and ends the consumer span.
    /// `Send` when the handler is.
    ///
    /// ```
    /// use contextflow_messaging::{Consumed, Consumer};
    /// use contextflow_otel::carrier::Pairs;
    ///
    /// let fut: Consumed<std::future::Ready<()>> =
    ///     Consumer::new().scope(&Pairs::default(), std::future::ready(()));
    /// fn assert_send<T: Send>(_: &T) {}
    /// assert_send(&fut);
    /// ```
    pub struct Consumed<F> {
        // `None` once done: `Drop` drops an unfinished handler inside the context.
        #[pin]
        inner: Option<F>,
        message: Option<MessageContext>,
        // Set while the handler is polled, cleared when its poll returns: still set in `Drop`
        // when that poll panicked (`thread::panicking` cannot tell: a panic already caught, a
        // sibling future's panic unwinding through this one).
        polling: bool,
    }

    impl<F> PinnedDrop for Consumed<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let mut inner = this.inner;
            if let Some(message) = this.message.take() {
                if inner.is_some() {
                    // The handler's poll panicked: a panic, as `Consumer::run` records it;
                    // otherwise the handler was given up on.
                    let why = if *this.polling { "panic" } else { "cancelled" };
                    message.run(|| inner.set(None));
                    message.end(Some(why));
                } else {
                    message.end(None);
                }
            }
        }
    }
}

// ===== impl Consumer =====

impl Consumer {
    /// A consumer with OpenTelemetry's global propagator (plus the request id) and the global
    /// tracer provider's tracer (no spans when none is installed).
    ///
    /// ```
    /// let consumer = contextflow_messaging::Consumer::new();
    /// # drop(consumer);
    /// ```
    pub fn new() -> Self {
        Consumer {
            propagation: Propagation::global(),
            spans: Spans::global(),
            system: None,
            destination: None,
            trust: None,
            isolated: Arc::default(),
        }
    }

    /// Extracts with `propagator` (plus the request id) instead of the global propagator.
    ///
    /// ```
    /// let consumer = contextflow_messaging::Consumer::new()
    ///     .with_propagator(contextflow_otel::TraceContextPropagator::new());
    /// # drop(consumer);
    /// ```
    pub fn with_propagator<P>(mut self, propagator: P) -> Self
    where
        P: TextMapPropagator + Send + Sync + 'static,
    {
        self.propagation = Propagation::with_propagator(propagator);
        self
    }

    /// Starts consumer spans with `tracer` instead of the global provider's.
    ///
    /// ```
    /// use opentelemetry::trace::TracerProvider as _;
    /// let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    /// let consumer = contextflow_messaging::Consumer::new().with_tracer(provider.tracer("orders"));
    /// # drop(consumer);
    /// ```
    pub fn with_tracer<T>(mut self, tracer: T) -> Self
    where
        T: opentelemetry::trace::Tracer + Send + Sync + 'static,
        T::Span: Send + Sync + 'static,
    {
        self.spans = Spans::tracer(tracer);
        self
    }

    /// Starts no spans: the handler runs in the producer's context as extracted.
    ///
    /// ```
    /// let consumer = contextflow_messaging::Consumer::new().without_spans();
    /// # drop(consumer);
    /// ```
    pub fn without_spans(mut self) -> Self {
        self.spans = Spans::Off;
        self
    }

    /// The `messaging.system` attribute of the consumer spans (`"rabbitmq"`, `"nats"`...).
    ///
    /// ```
    /// let consumer = contextflow_messaging::Consumer::new().system("rabbitmq");
    /// # drop(consumer);
    /// ```
    pub fn system(mut self, system: &'static str) -> Self {
        self.system = Some(system);
        self
    }

    /// The queue, topic or subject consumed: the `messaging.destination.name` attribute and
    /// part of the span name (`process orders`).
    ///
    /// ```
    /// let consumer = contextflow_messaging::Consumer::new().destination("orders");
    /// # drop(consumer);
    /// ```
    pub fn destination(mut self, destination: impl Into<Arc<str>>) -> Self {
        self.destination = Some(destination.into());
        self
    }

    /// Opts this consumer in to taking more than the propagated context from a message:
    /// `verify` gets the raw, untrusted metadata of each message (inside the message's
    /// context, so its logs carry the request id) and returns the bindings to add (the tenant,
    /// the user) once it has checked them, or `None` to add nothing. See the
    /// [module docs](crate::consume#tenant-and-user).
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// use contextflow_messaging::{Bindings, Consumer};
    ///
    /// static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");
    /// // A queue only our own services can publish to (a broker permission, checked at deploy).
    /// let internal = Consumer::new().trust(|metadata| {
    ///     Some(Bindings::new().bind(&TENANT, metadata.get("x-tenant")?.to_owned()))
    /// });
    /// # drop(internal);
    /// ```
    pub fn trust<F>(mut self, verify: F) -> Self
    where
        F: Fn(&dyn Extractor) -> Option<Bindings> + Send + Sync + 'static,
    {
        self.trust = Some(Arc::new(verify));
        self
    }

    /// Unsets `var` for every handler of this consumer: the handler's context is layered over
    /// the frame of whoever polls it, so a tenant or a user bound there (a consumer loop
    /// started inside a request, or with `contextflow::spawn` from one) would otherwise reach
    /// every message, also one that [`trust`](Consumer::trust)'s check refuses. A trusted
    /// consumer's [`Bindings`] still bind it.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// use contextflow_messaging::Consumer;
    /// use contextflow_otel::carrier::Pairs;
    ///
    /// static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let consumer = Consumer::new().isolate(&TENANT);
    /// let seen = TENANT
    ///     .scope("loop-tenant".into(), consumer.scope(&Pairs::default(), async { TENANT.get() }))
    ///     .await;
    /// assert_eq!(seen, None);
    /// # }
    /// ```
    pub fn isolate<T: Send + Sync + 'static>(mut self, var: &'static AsyncLocal<T>) -> Self {
        self.isolated = Arc::new((*self.isolated).clone().unset(var));
        self
    }

    /// The context of one message: extracted from `metadata`, with a consumer span that is a
    /// child of the producer's when there is a tracer. Its span is ended by
    /// [`MessageContext::scope`]'s future or by [`MessageContext::finish`].
    ///
    /// ```
    /// use contextflow_messaging::Consumer;
    /// use contextflow_otel::carrier::Pairs;
    ///
    /// let message = Consumer::new().context(&Pairs::new([("x-request-id", "bad id\n")]));
    /// // Malformed: dropped, and a fresh id made.
    /// assert_ne!(message.request_id().as_str(), "bad id\n");
    /// message.finish();
    /// ```
    pub fn context(&self, metadata: &dyn Extractor) -> MessageContext {
        self.context_described(metadata, self.info())
    }

    /// [`context`](Self::context), with a consumer span that `info` describes (a transport's
    /// own per-message attributes).
    pub(crate) fn context_described(
        &self,
        metadata: &dyn Extractor,
        info: SpanInfo<'_>,
    ) -> MessageContext {
        // Nothing of the loop's current OpenTelemetry context, also for a propagator that
        // reads the current context rather than the one it is given (OpenTelemetry's no-op).
        let _empty = Context::new().attach();
        let (cx, request_id) = self.propagation.extract_parts(&Context::new(), metadata);
        let cx = cx.with_value(request_id.clone());
        // A child of the producer's span, and linked to it: the messaging conventions ask a
        // `process` span to link to the message's creation context.
        let producer = cx.span().span_context().clone();
        let links = if producer.is_valid() {
            vec![producer]
        } else {
            Vec::new()
        };
        let span_cx = self.spans.start(&info, &cx, links, None);
        self.finish_context(cx, span_cx, request_id, Some(metadata))
    }

    /// The context of a batch of messages handled together: a fresh request id and, with a
    /// tracer, a new root `process` span with a link to each message's context (the
    /// OpenTelemetry messaging conventions for batch consumers). Without a tracer there is no
    /// trace. [`Consumer::trust`] is not applied to a batch: bind per message with
    /// [`Consumer::context`] where needed.
    ///
    /// ```
    /// use contextflow_messaging::Consumer;
    /// use contextflow_otel::carrier::Pairs;
    /// use opentelemetry::propagation::Extractor;
    ///
    /// let a = Pairs::new([("x-request-id", "a")]);
    /// let b = Pairs::new([("x-request-id", "b")]);
    /// let batch = Consumer::new().batch_context([&a as &dyn Extractor, &b]);
    /// assert!(!["a", "b"].contains(&batch.request_id().as_str()));
    /// batch.finish();
    /// ```
    pub fn batch_context<'a>(
        &self,
        metadata: impl IntoIterator<Item = &'a dyn Extractor>,
    ) -> MessageContext {
        // As in `context`: nothing of the loop's current OpenTelemetry context.
        let _empty = Context::new().attach();
        let mut links = Vec::new();
        let mut count = 0;
        for one in metadata {
            count += 1;
            let (cx, _) = self.propagation.extract_parts(&Context::new(), one);
            let span = cx.span();
            let sc = span.span_context();
            // A span holds at most 128 links by default; more are dropped by the SDK anyway.
            if sc.is_valid() && links.len() < 128 {
                links.push(sc.clone());
            }
        }
        let request_id = RequestId::new();
        let cx = Context::new().with_value(request_id.clone());
        let span_cx = self.spans.start(&self.info(), &cx, links, Some(count));
        self.finish_context(cx, span_cx, request_id, None)
    }

    /// Runs the handler `fut` of one message in the message's context; see
    /// [`Consumer::context`].
    ///
    /// ```
    /// use contextflow_messaging::Consumer;
    /// use contextflow_otel::carrier::Pairs;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let id = Consumer::new()
    ///     .scope(&Pairs::new([("x-request-id", "r-3")]), async { contextflow_otel::current_request_id() })
    ///     .await;
    /// assert_eq!(id.unwrap().as_str(), "r-3");
    /// # }
    /// ```
    pub fn scope<F: Future>(&self, metadata: &dyn Extractor, fut: F) -> Consumed<F> {
        self.context(metadata).scope(fut)
    }

    /// Runs the handler `fut` of a batch in the batch's context; see
    /// [`Consumer::batch_context`].
    ///
    /// ```
    /// use contextflow_messaging::Consumer;
    /// use contextflow_otel::carrier::Pairs;
    /// use opentelemetry::propagation::Extractor;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let messages = vec![Pairs::new([("x-request-id", "a")]), Pairs::new([("x-request-id", "b")])];
    /// let id = Consumer::new()
    ///     .batch_scope(messages.iter().map(|m| m as &dyn Extractor), async {
    ///         contextflow_otel::current_request_id()
    ///     })
    ///     .await;
    /// assert!(id.is_some());
    /// # }
    /// ```
    pub fn batch_scope<'a, F: Future>(
        &self,
        metadata: impl IntoIterator<Item = &'a dyn Extractor>,
        fut: F,
    ) -> Consumed<F> {
        self.batch_context(metadata).scope(fut)
    }

    /// Runs the synchronous handler `f` of one message in the message's context, and ends the
    /// consumer span (failed, when `f` panics).
    ///
    /// ```
    /// use contextflow_messaging::Consumer;
    /// use contextflow_otel::carrier::Pairs;
    /// let trace = Consumer::new().run(
    ///     &Pairs::new([("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]),
    ///     contextflow_otel::current_trace_id,
    /// );
    /// assert_eq!(trace.unwrap().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    /// ```
    pub fn run<R>(&self, metadata: &dyn Extractor, f: impl FnOnce() -> R) -> R {
        struct EndOnDrop(Option<MessageContext>);
        impl Drop for EndOnDrop {
            fn drop(&mut self) {
                if let Some(message) = self.0.take() {
                    message.end(Some("panic"));
                }
            }
        }
        let mut guard = EndOnDrop(Some(self.context(metadata)));
        let out = match &guard.0 {
            Some(message) => message.run(f),
            None => f(),
        };
        if let Some(message) = guard.0.take() {
            message.end(None);
        }
        out
    }

    pub(crate) fn info(&self) -> SpanInfo<'_> {
        SpanInfo {
            system: self.system,
            destination: self.destination.as_deref(),
            ..SpanInfo::default()
        }
    }

    fn finish_context(
        &self,
        cx: Context,
        span_cx: Option<Context>,
        request_id: RequestId,
        metadata: Option<&dyn Extractor>,
    ) -> MessageContext {
        let owns_span = span_cx.is_some();
        let cx = span_cx.unwrap_or(cx);
        let mut message = MessageContext {
            cx,
            request_id,
            isolated: self.isolated.clone(),
            trusted: Bindings::new(),
            owns_span,
            ended: AtomicBool::new(false),
        };
        if let (Some(verify), Some(metadata)) = (&self.trust, metadata) {
            match message.run(|| verify(metadata)) {
                Some(bindings) => message.trusted = bindings,
                None => tracing::debug!("message not verified: no tenant or user bound"),
            }
        }
        message
    }
}

impl Default for Consumer {
    fn default() -> Self {
        Consumer::new()
    }
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("propagation", &self.propagation)
            .field("spans", &self.spans)
            .field("system", &self.system)
            .field("destination", &self.destination)
            .field("trusted", &self.trust.is_some())
            .finish()
    }
}

// ===== impl MessageContext =====

impl MessageContext {
    /// The OpenTelemetry context the handler runs in (holding the consumer span when one was
    /// started, else the producer's span as a remote parent).
    ///
    /// ```
    /// use opentelemetry::trace::TraceContextExt as _;
    /// let message = contextflow_messaging::Consumer::new().context(&contextflow_otel::carrier::Pairs::default());
    /// assert!(!message.context().span().span_context().is_valid());
    /// ```
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// The message's request id: the producer's, or a fresh one.
    ///
    /// ```
    /// let message = contextflow_messaging::Consumer::new().context(&contextflow_otel::carrier::Pairs::default());
    /// assert_eq!(message.request_id().as_str().len(), 36, "a fresh UUID");
    /// ```
    pub fn request_id(&self) -> &RequestId {
        &self.request_id
    }

    /// A snapshot of the frame the handler would run in if polled here (the current frame with
    /// the message's bindings added), for work the handler hands to other code.
    ///
    /// ```
    /// use contextflow_otel::{carrier::Pairs, REQUEST_ID};
    /// let message = contextflow_messaging::Consumer::new().context(&Pairs::new([("x-request-id", "r-9")]));
    /// assert_eq!(message.snapshot().get(&REQUEST_ID).unwrap().as_str(), "r-9");
    /// ```
    pub fn snapshot(&self) -> Snapshot {
        self.run(Snapshot::capture)
    }

    /// Runs `f` in the message's context: its OpenTelemetry context attached, and its
    /// variables (`OTEL_CONTEXT`, `REQUEST_ID`, trusted bindings) bound *over the current
    /// frame*, so a binding made by the caller stays visible; the span stays open.
    ///
    /// ```
    /// use contextflow_otel::carrier::Pairs;
    /// let message = contextflow_messaging::Consumer::new().context(&Pairs::new([("x-request-id", "r-4")]));
    /// assert_eq!(message.run(contextflow_otel::current_request_id).unwrap().as_str(), "r-4");
    /// message.finish();
    /// ```
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        let otel = contextflow_otel::OtelContext::new(self.cx.clone());
        contextflow_otel::OTEL_CONTEXT.sync_scope(otel, || {
            contextflow_otel::REQUEST_ID.sync_scope(self.request_id.clone(), || {
                self.isolated.run(|| {
                    self.trusted.run(|| {
                        // The guard detaches on drop, also when `f` panics.
                        let _attached = self.cx.clone().attach();
                        f()
                    })
                })
            })
        })
    }

    /// Runs `fut` in the message's context and ends the consumer span when it finishes.
    ///
    /// ```
    /// use contextflow_otel::carrier::Pairs;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let message = contextflow_messaging::Consumer::new().context(&Pairs::new([("x-request-id", "r-5")]));
    /// let id = message.scope(async { contextflow_otel::current_request_id() }).await;
    /// assert_eq!(id.unwrap().as_str(), "r-5");
    /// # }
    /// ```
    pub fn scope<F: Future>(self, fut: F) -> Consumed<F> {
        Consumed {
            inner: Some(fut),
            message: Some(self),
            polling: false,
        }
    }

    /// Ends the consumer span, if one was started (for handlers run with
    /// [`run`](Self::run)). Dropping the message context ends it too: as finished, or as
    /// failed (`error.type = "panic"`) when the drop comes from a panic.
    ///
    /// ```
    /// let message = contextflow_messaging::Consumer::new().context(&contextflow_otel::carrier::Pairs::default());
    /// message.finish();
    /// ```
    pub fn finish(self) {
        self.end(None)
    }

    fn end(&self, error_type: Option<&'static str>) {
        if self.owns_span && !self.ended.swap(true, Ordering::Relaxed) {
            spans::end(&self.cx, error_type);
        }
    }
}

impl Drop for MessageContext {
    /// Ends the consumer span if nothing did: as failed with `error.type = "panic"` when the
    /// drop comes from a panic (a handler given to [`run`](Self::run) panicked before
    /// [`finish`](Self::finish)), as finished otherwise.
    fn drop(&mut self) {
        self.end(std::thread::panicking().then_some("panic"));
    }
}

impl fmt::Debug for MessageContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageContext")
            .field("request_id", &self.request_id)
            .field("trace_id", &self.cx.span().span_context().trace_id())
            .field("owns_span", &self.owns_span)
            .finish()
    }
}

// ===== impl Bindings =====

impl Bindings {
    /// No bindings.
    ///
    /// ```
    /// assert!(contextflow_messaging::Bindings::new().is_empty());
    /// ```
    pub fn new() -> Self {
        Bindings { binds: Vec::new() }
    }

    /// Adds `var = value`; later bindings are inner (and win for the same variable). The
    /// handler's every poll binds a clone of `value`.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static TENANT: AsyncLocal<&'static str> = AsyncLocal::new();
    /// let bindings = contextflow_messaging::Bindings::new().bind(&TENANT, "acme");
    /// assert!(!bindings.is_empty());
    /// ```
    pub fn bind<T>(mut self, var: &'static AsyncLocal<T>, value: T) -> Self
    where
        T: Clone + Send + Sync + 'static,
    {
        self.binds.push(Arc::new(move |inner: &mut dyn FnMut()| {
            var.sync_scope(value.clone(), inner)
        }));
        self
    }

    /// Adds an unset of `var`: the handler does not see a value of `var` from the frame it is
    /// polled in (later bindings may bind it again).
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static USER: AsyncLocal<String> = AsyncLocal::new();
    /// let bindings = contextflow_messaging::Bindings::new().unset(&USER);
    /// assert_eq!(bindings.len(), 1);
    /// ```
    pub fn unset<T: Send + Sync + 'static>(mut self, var: &'static AsyncLocal<T>) -> Self {
        self.binds.push(Arc::new(move |inner: &mut dyn FnMut()| {
            var.sync_unset(inner)
        }));
        self
    }

    /// The number of bindings.
    ///
    /// ```
    /// assert_eq!(contextflow_messaging::Bindings::new().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.binds.len()
    }

    /// Whether there are no bindings.
    ///
    /// ```
    /// assert!(contextflow_messaging::Bindings::default().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.binds.is_empty()
    }

    /// Runs `f` with every binding added over the current frame.
    fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        if self.binds.is_empty() {
            return f();
        }
        let mut f = Some(f);
        let mut out = None;
        self.run_from(0, &mut || {
            if let Some(f) = f.take() {
                out = Some(f());
            }
        });
        // Each binding runs its argument exactly once (`sync_scope`), or unwinds.
        out.expect("every binding runs the handler")
    }

    fn run_from(&self, i: usize, f: &mut dyn FnMut()) {
        match self.binds.get(i) {
            Some(bind) => bind(&mut || self.run_from(i + 1, f)),
            None => f(),
        }
    }
}

impl fmt::Debug for Bindings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bindings")
            .field("len", &self.binds.len())
            .finish()
    }
}

// ===== impl Consumed =====

impl<F: Future> Future for Consumed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut inner = this.inner;
        let Some(message) = this.message.as_ref() else {
            panic!("Consumed polled after completion");
        };
        let polling = this.polling;
        let poll = message.run(|| {
            let Some(fut) = inner.as_mut().as_pin_mut() else {
                return Poll::Pending;
            };
            // Records, when the poll ends, whether it ended by a panic.
            struct Polled<'a>(&'a mut bool);
            impl Drop for Polled<'_> {
                fn drop(&mut self) {
                    *self.0 = std::thread::panicking();
                }
            }
            let _polled = Polled(polling);
            let poll = fut.poll(cx);
            if poll.is_ready() {
                // Done: drop the handler now, inside the context.
                inner.set(None);
            }
            poll
        });
        if poll.is_ready() {
            if let Some(message) = this.message.take() {
                message.end(None);
            }
        }
        poll
    }
}

impl<F> fmt::Debug for Consumed<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumed")
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}
