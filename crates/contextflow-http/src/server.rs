//! Server middleware: [`PropagateContextLayer`] reads the caller's context from the request,
//! starts this service's server span, and runs the whole request inside it.
//!
//! For each request, [`PropagateContext`]:
//!
//! 1. extracts the caller's context with the configured propagation (OpenTelemetry's global
//!    propagator by default, see [`contextflow_otel::Propagation::global`]): trace context,
//!    baggage, and the request id (`x-request-id`, or a fresh one); a malformed value is
//!    dropped with a `debug` log;
//! 2. starts a real *server* span whose parent is the caller's span (the remote context), with
//!    the tracer of the global `TracerProvider` (or one given to the layer): the SDK's sampler
//!    decides whether a new trace is sampled. With no SDK installed the span is a no-op and
//!    the caller's span context passes through unchanged; no span id is made up;
//! 3. puts the request id on the request (so inner layers see it) and in its extensions (for
//!    axum's `Extension` extractor);
//! 4. runs the inner service's `call`, every poll of its future, the polling of the response
//!    body while it streams, and the drop of both inside the request's context: OpenTelemetry's
//!    current context (so `tracing-opentelemetry` spans and SDK spans are children of the
//!    server span) and contextflow's [`OTEL_CONTEXT`] and [`REQUEST_ID`] (the request id is
//!    there, not in OpenTelemetry's context: code that runs with only OpenTelemetry's context,
//!    outside contextflow's, has no request id to forward);
//! 5. echoes the request id on the response, unless the handler set one, and ends the span when
//!    the body ends (or is dropped), with `http.response.status_code`. The span fails, with
//!    `error.type`, when the answer was not delivered: `panic` (the handler, an inner layer's
//!    `call` or the body panicked: put tower-http's `CatchPanicLayer` inside this layer, so
//!    its answer and its log line have the request's context), `cancelled` (the client went
//!    away before or during the body: a body with something to send that the server drops
//!    before polling it counts too; one that said it had nothing to send, through
//!    `is_end_stream`, or on HTTP/1 an exact `size_hint` of 0, as servers ask, does not), `body` (the
//!    body failed),
//!    `content_length_mismatch` (the body ended short of its declared `Content-Length` or
//!    went past it; not for the answers that declare a length they do not send: to `HEAD`,
//!    `1xx`, `204`, `304`).
//!
//! The request's trace and baggage come from its headers only, never from an OpenTelemetry
//! context left attached on the thread that polls it.
//!
//! A request id that an earlier layer put in the request's extensions is used as it is.
//!
//! # Where it goes
//!
//! Outside tower-http's `TraceLayer` (listed before it in a `ServiceBuilder`), so the span
//! `TraceLayer` makes, and every log line in it, can read the request id and trace id:
//!
//! ```
//! use axum::{routing::get, Router};
//! use contextflow_http::PropagateContextLayer;
//! use tower::ServiceBuilder;
//! use tower_http::trace::TraceLayer;
//!
//! let app: Router = Router::new()
//!     .route("/", get(|| async { contextflow_http::current_request_id().unwrap().to_string() }))
//!     .layer(
//!         ServiceBuilder::new()
//!             .layer(PropagateContextLayer::new()) // outermost: runs first
//!             .layer(TraceLayer::new_for_http().make_span_with(|_req: &http::Request<_>| {
//!                 let request_id = contextflow_http::current_request_id();
//!                 let trace_id = contextflow_http::current_trace_id();
//!                 tracing::info_span!(
//!                     "request",
//!                     request_id = %request_id.as_ref().map_or("", |id| id.as_str()),
//!                     trace_id = %trace_id.map(|id| id.to_string()).unwrap_or_default(),
//!                 )
//!             })),
//!     );
//! # drop(app);
//! ```
//!
//! # Tenant and user
//!
//! This layer never sets the tenant or the user: they come from authenticated code, in the
//! application's own variables. Bind them in an inner middleware, after checking the
//! credentials; they then show up in the handler and everything it spawns with
//! `contextflow::spawn`:
//!
//! ```
//! use axum::{extract::Request, middleware::Next, response::Response, routing::get, Router};
//! use contextflow::AsyncLocal;
//! use contextflow_http::PropagateContextLayer;
//! use http::StatusCode;
//!
//! static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");
//!
//! async fn authenticate(req: Request, next: Next) -> Result<Response, StatusCode> {
//!     // A real service verifies a token here; the header is only a stand-in.
//!     let tenant = req
//!         .headers()
//!         .get("x-verified-tenant")
//!         .and_then(|v| v.to_str().ok())
//!         .ok_or(StatusCode::UNAUTHORIZED)?
//!         .to_owned();
//!     Ok(TENANT.scope(tenant, next.run(req)).await)
//! }
//!
//! let app: Router = Router::new()
//!     .route("/", get(|| async { TENANT.get().unwrap_or_default() }))
//!     .layer(axum::middleware::from_fn(authenticate)) // inner: runs in the request's context
//!     .layer(PropagateContextLayer::new()); // outer
//! # drop(app);
//! ```
//!
//! The layer adds its bindings (the OpenTelemetry context, the request id) over the frame of
//! whoever polls it, so a layer *outside* it that binds a variable around its future (`let fut
//! = inner.call(req); Box::pin(X.scope(v, fut))`) is seen by the handler too, and by the
//! response body, which keeps the frame as it was when the response was ready.
//!
//! `TENANT.scope` covers the handler; the response body, streamed after the handler returns,
//! sees the request's context but not the tenant. Wrap the body too (with
//! [`ContextBody`] and a [`Snapshot`] captured inside the scope) when a
//! streaming body needs it.

use std::{
    cell::Cell,
    fmt,
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicBool, Ordering},
    task::{ready, Context, Poll},
};

use bytes::{Buf as _, Bytes};
use contextflow::{Binding, Snapshot};
use contextflow_otel::{
    carrier::FieldValues, OtelContext, Propagation, RequestId, OTEL_CONTEXT, REQUEST_ID,
};
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::SpanKind,
    KeyValue,
};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    spans::{self, Spans},
    HeaderExtractor, X_REQUEST_ID,
};

/// A [`Layer`] that wraps services in [`PropagateContext`].
///
/// ```
/// use contextflow_http::PropagateContextLayer;
/// use tower::ServiceBuilder;
///
/// let layer = PropagateContextLayer::new();
/// let svc = ServiceBuilder::new()
///     .layer(layer)
///     .service_fn(|_req: http::Request<String>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
///     });
/// # drop(svc);
/// ```
#[derive(Clone, Debug)]
pub struct PropagateContextLayer {
    propagation: Propagation,
    spans: Spans,
    url_scheme: &'static str,
}

/// Middleware that runs each request inside the context its headers carry (see the
/// [module docs](self)).
///
/// ```
/// use contextflow_http::{PropagateContext, REQUEST_ID};
/// use tower::{service_fn, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let svc = PropagateContext::new(service_fn(|_req: http::Request<String>| async {
///     let id = REQUEST_ID.get().unwrap();
///     Ok::<_, std::convert::Infallible>(http::Response::new(id.to_string()))
/// }));
/// let req = http::Request::builder().header("x-request-id", "abc").body(String::new())?;
/// let res = svc.oneshot(req).await?;
/// assert_eq!(res.headers()["x-request-id"], "abc");
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PropagateContext<S> {
    inner: S,
    propagation: Propagation,
    spans: Spans,
    url_scheme: &'static str,
}

pin_project! {
    /// The response future of [`PropagateContext`]: polls (and drops) the inner future inside
    /// the request's context, then echoes the request id and wraps the body in a
    /// [`ContextBody`] that ends the server span.
    ///
    /// ```
    /// use contextflow_http::{PropagateContext, ResponseFuture};
    /// use tower::{service_fn, Service, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let mut svc = PropagateContext::new(service_fn(|_req: http::Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(()))
    /// }));
    /// let fut: ResponseFuture<_> = svc.ready().await?.call(http::Request::new(()));
    /// let res = fut.await?;
    /// assert_eq!(res.headers()["x-request-id"].len(), 36, "a fresh request id, echoed");
    /// # Ok(())
    /// # }
    /// ```
    pub struct ResponseFuture<F> {
        // `None` once done or dropped: `Drop` replaces it inside the context.
        #[pin]
        inner: Option<F>,
        scope: Option<RequestScope>,
        request_id: Option<HeaderValue>,
        // Set while the inner future is polled: still set in `Drop` when that poll panicked.
        polling: bool,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let mut inner = this.inner;
            if let Some(mut scope) = this.scope.take() {
                if inner.is_some() {
                    scope.run(|| inner.set(None));
                    // The handler panicked, or the client went away before the response: the
                    // span ends here.
                    scope.end_with_error(if *this.polling { "panic" } else { "cancelled" });
                }
            }
        }
    }
}

pin_project! {
    /// A response body polled, and dropped, inside a captured context.
    ///
    /// [`PropagateContext`] wraps every response body in one, so a streaming body (server-sent
    /// events, a large download produced on the fly) sees the request's context; the server
    /// span ends when the body ends or is dropped.
    ///
    /// ```
    /// use contextflow::Snapshot;
    /// use contextflow_http::ContextBody;
    /// use http_body_util::BodyExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let body = ContextBody::new(String::from("hello"), Snapshot::capture());
    /// assert_eq!(body.collect().await?.to_bytes(), "hello");
    /// # Ok(())
    /// # }
    /// ```
    pub struct ContextBody<B> {
        scope: RequestScope,
        status: u16,
        // Whether `poll_frame` ran: a body dropped after that but before its end was cut short.
        polled: bool,
        // Whether `is_end_stream` or an exact `size_hint` of 0 said the body had nothing to
        // send (a server asks before it polls, and does not poll such a body): dropped
        // unpolled, it lost nothing. Atomic:
        // `is_end_stream` takes `&self`, and the body stays `Sync` when its inner one is.
        said_empty: AtomicBool,
        // The bytes still owed of a declared length (`Content-Length`, or an exact size hint):
        // at 0 the answer is complete, even if the body never says it ended (a server stops
        // polling once the declared length is written, and drops the body).
        remaining: Option<u64>,
        // Whether the body sent more than its declared length.
        overlong: bool,
        // Set while the inner body is polled: still set in `Drop` when that poll panicked.
        polling: bool,
        // The `grpc-status` of a gRPC answer: from the response's headers (trailers-only), or
        // from the trailers when they come.
        grpc: Option<u8>,
        // `None` once the body has ended (dropped then, inside the context) or in `Drop`.
        #[pin]
        inner: Option<B>,
    }

    impl<B> PinnedDrop for ContextBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let mut inner = this.inner;
            // A body dropped after its first poll but before its end (the client went away
            // mid-stream) failed, whatever the status line said; so did one dropped before its
            // first poll that had something to send (the client reset the stream as the
            // handler finished); one with nothing to send (`HEAD`, `204`, `304`, a `2xx` to
            // `CONNECT`, a `Content-Length: 0`, a body that said it was empty) did not.
            let had_data = *this.polled
                || !(this.scope.head
                    || no_body(*this.status)
                    || (this.scope.connect && (200..300).contains(this.status))
                    || this.said_empty.load(Ordering::Relaxed));
            let cut_short = had_data && inner.is_some() && *this.remaining != Some(0);
            if inner.is_some() {
                this.scope.run(|| inner.set(None));
            }
            if *this.polling {
                // The body panicked while it was polled.
                this.scope.end_error_ref("panic", Some(*this.status), *this.grpc);
            } else if *this.overlong {
                // Past its declared length: the server cut it there (HTTP/1.1) or reset the
                // stream (HTTP/2), and stopped polling.
                this.scope
                    .end_error_ref("content_length_mismatch", Some(*this.status), *this.grpc);
            } else if cut_short {
                this.scope.end_error_ref("cancelled", Some(*this.status), *this.grpc);
            } else {
                this.scope.end(*this.status, *this.grpc);
            }
        }
    }
}

/// Whether an answer with `status` never has a body (RFC 9110, section 6.4.1).
fn no_body(status: u16) -> bool {
    status < 200 || status == 204 || status == 304
}

/// The response's declared length: its one `Content-Length` header, if that is a number.
fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let text = value.to_str().ok()?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The context a request runs in: contextflow's frame, OpenTelemetry's context, and whether
/// the layer owns the span in it (and so ends it).
struct RequestScope {
    frame: RequestFrame,
    cx: Option<opentelemetry::Context>,
    owns_span: bool,
    /// An HTTP/2 request (gRPC runs on nothing else): only then is the answer's `grpc-status`
    /// looked for.
    http2: bool,
    /// A `HEAD` request: its answer declares a length it does not send.
    head: bool,
    /// A `CONNECT` request: a `2xx` answer has no body (the connection becomes a tunnel).
    connect: bool,
}

/// How a request's bindings are entered.
enum RequestFrame {
    /// Layered over the frame of whoever polls (`call` and the response future), so that a
    /// binding made by an outer layer around this layer's future stays visible in the handler.
    /// Their nodes are made once and reused while the caller's frame stays the same (in a
    /// plain server, `call` and every poll run under the same frame).
    Layered {
        otel: Binding<OtelContext>,
        request_id: Binding<RequestId>,
    },
    /// A frame captured when the response was ready (what the body runs in: the server polls
    /// the body after the response future, outside any outer layer), or given to
    /// [`ContextBody::new`].
    Captured(Snapshot),
}

// ===== impl PropagateContextLayer =====

impl PropagateContextLayer {
    /// A layer with the global propagation ([`Propagation::global`]) and server spans from the
    /// global `TracerProvider` (read at the first request).
    ///
    /// ```
    /// use tower::{service_fn, Layer, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let svc = contextflow_http::PropagateContextLayer::new().layer(service_fn(|_req: http::Request<()>| async {
    ///     let id = contextflow_http::current_request_id().unwrap();
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(id.to_string()))
    /// }));
    /// let req = http::Request::builder().header("x-request-id", "r-1").body(())?;
    /// let res = svc.oneshot(req).await?;
    /// assert_eq!(res.headers()["x-request-id"], "r-1");
    /// assert_eq!(res.body().get_ref().map(String::as_str), Some("r-1"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn new() -> Self {
        PropagateContextLayer {
            propagation: Propagation::global(),
            spans: Spans::global(),
            url_scheme: "http",
        }
    }

    /// The `url.scheme` of server spans for requests whose target names none (an HTTP/1.1
    /// request line carries the path only): `"http"` unless set, as the server receives it
    /// behind a proxy that ends TLS; `"https"` for a server that ends TLS itself. A request
    /// whose target has a scheme (HTTP/2's `:scheme`) keeps its own.
    ///
    /// ```
    /// let layer = contextflow_http::PropagateContextLayer::new().with_url_scheme("https");
    /// # drop(layer);
    /// ```
    pub fn with_url_scheme(mut self, scheme: &'static str) -> Self {
        self.url_scheme = scheme;
        self
    }

    /// Uses `propagator` to read the trace context (B3, Jaeger, Datadog, a composite...)
    /// instead of the global one; the request id is read in any case.
    ///
    /// ```
    /// use contextflow_http::PropagateContextLayer;
    /// let layer = PropagateContextLayer::new()
    ///     .with_propagator(contextflow_otel::TraceContextPropagator::new());
    /// # drop(layer);
    /// ```
    pub fn with_propagator<P>(mut self, propagator: P) -> Self
    where
        P: TextMapPropagator + Send + Sync + 'static,
    {
        self.propagation = Propagation::with_propagator(propagator);
        self
    }

    /// Starts server spans with `tracer` instead of the global provider's.
    ///
    /// ```
    /// use opentelemetry::trace::TracerProvider as _;
    /// let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    /// let layer = contextflow_http::PropagateContextLayer::new().with_tracer(provider.tracer("svc"));
    /// # drop(layer);
    /// ```
    pub fn with_tracer<T>(mut self, tracer: T) -> Self
    where
        T: opentelemetry::trace::Tracer + Send + Sync + 'static,
        T::Span: Send + Sync + 'static,
    {
        self.spans = Spans::tracer(tracer);
        self
    }

    /// Starts no span: the handler runs in the caller's (remote) context as extracted.
    ///
    /// ```
    /// use tower::{service_fn, Layer, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let layer = contextflow_http::PropagateContextLayer::new().without_spans();
    /// let svc = layer.layer(service_fn(|_req: http::Request<()>| async {
    ///     let span = contextflow_http::current_span_id().map(|id| id.to_string());
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(span))
    /// }));
    /// let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    /// let req = http::Request::builder().header("traceparent", tp).body(())?;
    /// let res = svc.oneshot(req).await?;
    /// let span = res.body().get_ref().cloned().flatten();
    /// assert_eq!(span.as_deref(), Some("00f067aa0ba902b7"), "the caller's span");
    /// # Ok(())
    /// # }
    /// ```
    pub fn without_spans(mut self) -> Self {
        self.spans = Spans::Off;
        self
    }
}

impl Default for PropagateContextLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for PropagateContextLayer {
    type Service = PropagateContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PropagateContext {
            inner,
            propagation: self.propagation.clone(),
            spans: self.spans.clone(),
            url_scheme: self.url_scheme,
        }
    }
}

// ===== impl PropagateContext =====

impl<S> PropagateContext<S> {
    /// Wraps `inner` with the default settings.
    ///
    /// ```
    /// use contextflow_http::PropagateContext;
    /// let svc = PropagateContext::new(tower::service_fn(|_req: http::Request<()>| async move {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(()))
    /// }));
    /// # drop(svc);
    /// ```
    pub fn new(inner: S) -> Self {
        PropagateContextLayer::new().layer(inner)
    }

    /// A [`PropagateContextLayer`] (the same as [`PropagateContextLayer::new`]).
    ///
    /// ```
    /// use tower::Layer;
    /// let layer = contextflow_http::PropagateContext::<()>::layer();
    /// assert_eq!(layer.layer(7).into_inner(), 7);
    /// ```
    pub fn layer() -> PropagateContextLayer {
        PropagateContextLayer::new()
    }

    /// The inner service.
    ///
    /// ```
    /// let svc = contextflow_http::PropagateContext::new(7);
    /// assert_eq!(*svc.get_ref(), 7);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    ///
    /// ```
    /// let mut svc = contextflow_http::PropagateContext::new(7);
    /// *svc.get_mut() += 1;
    /// assert_eq!(svc.into_inner(), 8);
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    ///
    /// ```
    /// assert_eq!(contextflow_http::PropagateContext::new(7).into_inner(), 7);
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for PropagateContext<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ContextBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // Straight from the header map (one pass over it, nothing allocated) with the default
        // propagators.
        let carrier = RequestHeaders {
            headers: HeaderExtractor(req.headers()),
            request_ids: Cell::new(None),
        };
        // From an empty context, not the thread's current one: a request's trace and baggage
        // come from its headers only, never from whatever another request's code left attached
        // on this thread (an OpenTelemetry guard held across an `.await`).
        let (cx, extracted_id) = self
            .propagation
            .extract_parts_from(&opentelemetry::Context::new(), &carrier);
        let id_headers = carrier.request_ids.get();
        let request_id = match req.extensions().get::<RequestId>() {
            Some(set_earlier) => set_earlier.clone(),
            None => extracted_id,
        };
        // The request id is not added to the OpenTelemetry context (three allocations): it is
        // bound to `REQUEST_ID` wherever the context is, and injection reads it from there.

        // The one incoming `x-request-id`, if there is exactly one: a repeated header is
        // replaced below even when its first copy is the id chosen, so that inner layers never
        // see a second, unchecked value.
        let incoming = match id_headers {
            Some(0) => None,
            Some(1) => req.headers().get(X_REQUEST_ID),
            Some(_) => None,
            None => {
                let mut all = req.headers().get_all(X_REQUEST_ID).iter();
                match (all.next(), all.next()) {
                    (Some(only), None) => Some(only),
                    _ => None,
                }
            }
        };
        let id_value = match incoming {
            Some(value) if value.as_bytes() == request_id.as_str().as_bytes() => value.clone(),
            _ => {
                // Missing, malformed, repeated, or not what an earlier layer chose: one clean
                // value. A request id is visible ASCII, so it is a valid header value.
                // It shares the id's bytes: echoing it on the response is a reference count.
                let value =
                    HeaderValue::from_maybe_shared(Bytes::from_owner(IdBytes(request_id.clone())))
                        .unwrap_or_else(|_| HeaderValue::from_static("-"));
                req.headers_mut().insert(X_REQUEST_ID, value.clone());
                value
            }
        };
        req.extensions_mut().insert(request_id.clone());

        let url_scheme = self.url_scheme;
        let span_cx = self.spans.start(
            SpanKind::Server,
            req.method(),
            || spans::grpc_call(req.method(), req.headers(), req.uri()),
            &cx,
            |attrs| {
                attrs.push(KeyValue::new("url.path", req.uri().path().to_owned()));
                // Required by the conventions: the request's own, or the layer's.
                let scheme = match req.uri().scheme_str() {
                    Some(scheme) => opentelemetry::Value::from(scheme.to_owned()),
                    None => opentelemetry::Value::from(url_scheme),
                };
                attrs.push(KeyValue::new("url.scheme", scheme));
                attrs.push(KeyValue::new(
                    "network.protocol.version",
                    protocol_version(req.version()),
                ));
            },
        );
        let owns_span = span_cx.is_some();
        let cx = span_cx.unwrap_or(cx);
        let mut scope = RequestScope {
            frame: RequestFrame::Layered {
                otel: Binding::new(&OTEL_CONTEXT, OtelContext::new(cx.clone())),
                request_id: Binding::new(&REQUEST_ID, request_id),
            },
            cx: Some(cx),
            owns_span,
            http2: req.version() == http::Version::HTTP_2,
            head: req.method() == http::Method::HEAD,
            connect: req.method() == http::Method::CONNECT,
        };
        // `call` itself runs in the context too: layers such as `TraceLayer` make their span here.
        // A panic in it (an inner layer's, before any future exists) ends the span as one.
        let panicking = EndOnPanic(&mut scope);
        let inner = panicking.0.run(|| self.inner.call(req));
        std::mem::forget(panicking);
        ResponseFuture {
            inner: Some(inner),
            scope: Some(scope),
            request_id: Some(id_value),
            polling: false,
        }
    }
}

// ===== impl ResponseFuture =====

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ContextBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if this.inner.is_none() {
            panic!("ResponseFuture polled after completion");
        }
        let mut inner = this.inner;
        // Returns the frame for the body once the inner future is done.
        let mut poll = |inner: &mut Pin<&mut Option<F>>| {
            let result = inner.as_mut().as_pin_mut().map(|f| f.poll(cx))?;
            match result {
                Poll::Ready(output) => {
                    // Done: drop the inner future now, inside the context. The body is polled
                    // by the server after this future, outside any outer layer: it keeps the
                    // frame as it is now, the outer layers' bindings included.
                    inner.set(None);
                    Some(Poll::Ready((output, Snapshot::capture())))
                }
                Poll::Pending => Some(Poll::Pending),
            }
        };
        *this.polling = true;
        let result = match this.scope.as_mut() {
            Some(scope) => scope.run(|| poll(&mut inner)),
            None => poll(&mut inner),
        };
        *this.polling = false;
        let Some(Poll::Ready((result, snapshot))) = result else {
            return Poll::Pending;
        };
        let mut scope = this.scope.take().unwrap_or_else(RequestScope::empty);
        scope.frame = RequestFrame::Captured(snapshot);
        let request_id = this.request_id.take();
        Poll::Ready(match result {
            Ok(mut res) => {
                if let Some(id) = request_id {
                    // Never override a request id the handler chose.
                    res.headers_mut().entry(X_REQUEST_ID).or_insert(id);
                }
                let status = res.status().as_u16();
                // Only a span of ours records it, and only gRPC's HTTP/2 carries it (a header
                // lookup saved on every other request).
                let grpc = if scope.owns_span && scope.http2 {
                    spans::grpc_status(res.headers())
                } else {
                    None
                };
                // The declared length (without one, the body's exact size hint, on first poll):
                // it decides how a span of ours ends, so without one it is not looked up. An
                // answer that has no body (to `HEAD`; `1xx`, `204`, `304`) declares the length
                // of one it does not send: none to count.
                let remaining = if scope.owns_span && !scope.head && !no_body(status) {
                    content_length(res.headers())
                } else {
                    None
                };
                Ok(res.map(|body| ContextBody {
                    scope,
                    status,
                    polled: false,
                    said_empty: AtomicBool::new(false),
                    remaining,
                    overlong: false,
                    polling: false,
                    grpc,
                    inner: Some(body),
                }))
            }
            Err(err) => {
                scope.end_with_error("_OTHER");
                Err(err)
            }
        })
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

// ===== impl ContextBody =====

impl<B> ContextBody<B> {
    /// Wraps `body` so it is polled and dropped inside `snapshot`.
    ///
    /// ```
    /// use contextflow::Snapshot;
    /// use contextflow_otel::{RequestId, REQUEST_ID};
    /// let id: RequestId = "r-1".parse()?;
    /// let body = REQUEST_ID.sync_scope(id, || {
    ///     contextflow_http::ContextBody::new(String::new(), Snapshot::capture())
    /// });
    /// assert_eq!(body.snapshot().get(&REQUEST_ID).unwrap().as_str(), "r-1");
    /// # Ok::<(), contextflow_otel::InvalidRequestId>(())
    /// ```
    pub fn new(body: B, snapshot: Snapshot) -> Self {
        ContextBody {
            scope: RequestScope {
                frame: RequestFrame::Captured(snapshot),
                cx: None,
                owns_span: false,
                http2: false,
                head: false,
                connect: false,
            },
            status: 0,
            polled: false,
            said_empty: AtomicBool::new(false),
            remaining: None,
            overlong: false,
            polling: false,
            grpc: None,
            inner: Some(body),
        }
    }

    /// The wrapped body; `None` once it has ended (it is dropped, inside the context, as soon
    /// as it yields its last frame).
    ///
    /// ```
    /// use contextflow::Snapshot;
    /// use http_body_util::BodyExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let mut body = contextflow_http::ContextBody::new(String::from("hi"), Snapshot::empty());
    /// assert_eq!(body.get_ref().map(String::as_str), Some("hi"));
    /// let frame = body.frame().await.unwrap()?;
    /// assert_eq!(frame.into_data().unwrap(), "hi");
    /// assert_eq!(body.get_ref(), None, "ended: dropped already");
    /// # Ok(())
    /// # }
    /// ```
    pub fn get_ref(&self) -> Option<&B> {
        self.inner.as_ref()
    }

    /// The context the body runs in.
    ///
    /// ```
    /// use contextflow::Snapshot;
    /// let body = contextflow_http::ContextBody::new((), Snapshot::empty());
    /// assert!(body.snapshot().is_empty());
    /// ```
    pub fn snapshot(&self) -> &Snapshot {
        match &self.scope.frame {
            RequestFrame::Captured(snapshot) => snapshot,
            // A body is made by `new` or from a ready response, whose scope `capture`d first.
            RequestFrame::Layered { .. } => unreachable!("a body's frame is always captured"),
        }
    }
}

impl<B: Body> Body for ContextBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        if inner.is_none() {
            return Poll::Ready(None);
        }
        if !*this.polled {
            *this.polled = true;
            if this.remaining.is_none() && this.scope.owns_span {
                *this.remaining = inner
                    .as_ref()
                    .as_pin_ref()
                    .and_then(|b| b.size_hint().exact());
            }
        }
        *this.polling = true;
        let polled = this.scope.run(|| {
            let Some(body) = inner.as_mut().as_pin_mut() else {
                return Poll::Ready((None, true));
            };
            let frame = ready!(body.poll_frame(cx));
            let ended = match &frame {
                None => true,
                // Trailers are a body's last frame (whatever `is_end_stream` says after them).
                Some(Ok(frame)) if frame.is_trailers() => true,
                Some(Ok(frame)) => {
                    if let (Some(remaining), Some(data)) =
                        (this.remaining.as_mut(), frame.data_ref())
                    {
                        match remaining.checked_sub(data.remaining() as u64) {
                            Some(left) => *remaining = left,
                            None => {
                                *remaining = 0;
                                *this.overlong = true;
                            }
                        }
                    }
                    inner
                        .as_ref()
                        .as_pin_ref()
                        .is_none_or(|b| b.is_end_stream())
                }
                Some(Err(_)) => false,
            };
            if ended {
                // The body is done: drop it now, inside the context, rather than in a
                // second visit to the context when the server drops us.
                inner.set(None);
            }
            Poll::Ready((frame, ended))
        });
        *this.polling = false;
        let (frame, ended) = ready!(polled);
        if let Some(Ok(trailers)) = frame.as_ref().map(|f| f.as_ref().map(Frame::trailers_ref)) {
            if let Some(code) = trailers.and_then(spans::grpc_status) {
                *this.grpc = Some(code);
            }
        }
        if ended {
            // A body that ends short of its declared length, or went past it, is an answer the
            // server cannot deliver (HTTP/1.1 closes the connection, HTTP/2 resets the stream).
            let short = this.remaining.is_some_and(|left| left > 0);
            if short || *this.overlong {
                this.scope
                    .end_error_ref("content_length_mismatch", Some(*this.status), *this.grpc);
            } else {
                this.scope.end(*this.status, *this.grpc);
            }
        } else if let Some(Err(_)) = &frame {
            this.scope
                .end_error_ref("body", Some(*this.status), *this.grpc);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            // A plain accessor: no need to enter the request's context.
            Some(inner) => {
                let empty = inner.is_end_stream();
                if empty {
                    self.said_empty.store(true, Ordering::Relaxed);
                }
                empty
            }
            None => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) => {
                let hint = inner.size_hint();
                if hint.exact() == Some(0) && !self.scope.http2 {
                    // Nothing to send, as `is_end_stream` would say: hyper's HTTP/1 writes
                    // `Content-Length: 0` for such a body and drops it unpolled. (Not on
                    // HTTP/2, where a body without data may still have trailers to send, a
                    // gRPC status among them, and is polled for them.)
                    self.said_empty.store(true, Ordering::Relaxed);
                }
                hint
            }
            None => SizeHint::with_exact(0),
        }
    }
}

impl<B> fmt::Debug for ContextBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("ContextBody");
        if let RequestFrame::Captured(snapshot) = &self.scope.frame {
            debug.field("snapshot", snapshot);
        }
        debug.finish_non_exhaustive()
    }
}

/// Ends the request's span as `panic` when dropped: armed around the inner service's `call`,
/// and forgotten once it returned.
struct EndOnPanic<'a>(&'a mut RequestScope);

impl Drop for EndOnPanic<'_> {
    fn drop(&mut self) {
        self.0.end_error_ref("panic", None, None);
    }
}

// ===== impl RequestScope =====

impl RequestScope {
    fn empty() -> Self {
        RequestScope {
            frame: RequestFrame::Captured(Snapshot::empty()),
            cx: None,
            owns_span: false,
            http2: false,
            head: false,
            connect: false,
        }
    }

    /// Runs `f` in the request's frame with its OpenTelemetry context attached (inside the
    /// frame, so it wins over a context that a registered carrier restores with the frame).
    fn run<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let RequestScope { frame, cx, .. } = self;
        let attached = || match cx {
            Some(cx) => {
                let _attached = cx.clone().attach();
                f()
            }
            None => f(),
        };
        match frame {
            RequestFrame::Layered { otel, request_id } => otel.run(|| request_id.run(attached)),
            RequestFrame::Captured(snapshot) => snapshot.run(attached),
        }
    }

    /// Ends the server span (once) with the response status.
    fn end(&mut self, status: u16, grpc: Option<u8>) {
        if self.owns_span {
            self.owns_span = false;
            if let Some(cx) = &self.cx {
                spans::end_with_status(cx, status, SpanKind::Server, grpc);
            }
        }
    }

    /// Ends the server span (once) as failed.
    fn end_with_error(mut self, error_type: &'static str) {
        self.end_error_ref(error_type, None, None)
    }

    /// Ends the server span (once) as failed, with the status and gRPC status sent, if any.
    fn end_error_ref(&mut self, error_type: &'static str, status: Option<u16>, grpc: Option<u8>) {
        if self.owns_span {
            self.owns_span = false;
            if let Some(cx) = &self.cx {
                spans::end_failed(cx, error_type, status.filter(|s| *s != 0), grpc);
            }
        }
    }
}

/// A request id as the bytes of a header value.
struct IdBytes(RequestId);

/// The request's headers as a propagation carrier that counts the `x-request-id` values its
/// one-pass scan sees, so that `call` need not look the header up again when there was none.
struct RequestHeaders<'a> {
    headers: HeaderExtractor<'a>,
    /// `Some(count)` once scanned.
    request_ids: Cell<Option<usize>>,
}

impl Extractor for RequestHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.headers.get(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.headers.keys()
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        self.headers.get_all(key)
    }
}

impl FieldValues for RequestHeaders<'_> {
    fn field_values<'s>(&'s self, key: &str) -> impl Iterator<Item = &'s [u8]> {
        self.headers.field_values(key)
    }

    fn scan_fields<'s>(&'s self, keys: &[&str], mut f: impl FnMut(usize, &'s [u8])) -> bool {
        let id_key = keys
            .iter()
            .position(|k| *k == contextflow_otel::X_REQUEST_ID);
        let mut ids = 0;
        let scanned = self.headers.scan_fields(keys, |i, value| {
            if Some(i) == id_key {
                ids += 1;
            }
            f(i, value)
        });
        if scanned && id_key.is_some() {
            self.request_ids.set(Some(ids));
        }
        scanned
    }
}

impl AsRef<[u8]> for IdBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_str().as_bytes()
    }
}

fn protocol_version(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
}
