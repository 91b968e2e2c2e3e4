//! Server middleware: [`PropagateContextLayer`] reads the caller's context from the request and
//! runs the whole request inside it.
//!
//! For each request, [`PropagateContext`]:
//!
//! 1. reads `traceparent`, `tracestate`, `baggage` and `x-request-id` (see
//!    [`IncomingContext`]); a malformed value is dropped with a `debug` log and a fresh one made;
//! 2. makes this service's span id (a child of the caller's span, or the root of a new trace);
//! 3. puts the request id on the request (so inner layers and logs see it) and the
//!    [`RequestId`] and [`TraceContext`] in its extensions (for axum's `Extension` extractor);
//! 4. binds [`TRACE_CONTEXT`](crate::TRACE_CONTEXT), [`REQUEST_ID`](crate::REQUEST_ID) and
//!    [`BAGGAGE`](crate::BAGGAGE) for the inner service's `call`, every poll of its future, the
//!    polling of the response body while it streams, and the drop of both;
//! 5. echoes the request id on the response, unless the handler set one.
//!
//! A request id or trace context that an earlier layer put in the request's extensions is used
//! as it is.
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
//! `TENANT.scope` covers the handler; the response body, streamed after the handler returns,
//! sees the request's context but not the tenant. Wrap the body too (with
//! [`ContextBody`] and a [`Snapshot`] captured inside the scope) when a
//! streaming body needs it.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use contextflow::{FutureExt as _, Snapshot, WithContext};
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    context::{extract_baggage, extract_request_id, extract_trace_context},
    IncomingContext, RequestId, TraceContext, X_REQUEST_ID,
};

/// A [`Layer`] that wraps services in [`PropagateContext`].
///
/// ```
/// use contextflow_http::PropagateContextLayer;
/// use tower::ServiceBuilder;
///
/// let layer = PropagateContextLayer::new().sample_new_traces(false);
/// let svc = ServiceBuilder::new()
///     .layer(layer)
///     .service_fn(|_req: http::Request<String>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
///     });
/// # drop(svc);
/// ```
#[derive(Clone, Debug)]
pub struct PropagateContextLayer {
    sample_new_traces: bool,
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
    sample_new_traces: bool,
}

pin_project! {
    /// The response future of [`PropagateContext`]: polls the inner future inside the request's
    /// context, then echoes the request id and wraps the body in a [`ContextBody`].
    ///
    /// ```
    /// use contextflow_http::{PropagateContext, ResponseFuture};
    /// use tower::{service_fn, Service};
    ///
    /// let mut svc = PropagateContext::new(service_fn(|_req: http::Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(()))
    /// }));
    /// let fut = svc.call(http::Request::new(()));
    /// let _: &ResponseFuture<_> = &fut;
    /// ```
    pub struct ResponseFuture<F> {
        #[pin]
        inner: WithContext<F>,
        snapshot: Option<Snapshot>,
        request_id: Option<HeaderValue>,
    }
}

pin_project! {
    /// A response body polled, and dropped, inside a captured context.
    ///
    /// [`PropagateContext`] wraps every response body in one, so a streaming body (server-sent
    /// events, a large download produced on the fly) sees the request's context.
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
        snapshot: Snapshot,
        // `None` only once dropped: `Drop` replaces it inside the snapshot.
        #[pin]
        inner: Option<B>,
    }

    impl<B> PinnedDrop for ContextBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let mut inner = this.inner;
            this.snapshot.run(|| inner.set(None));
        }
    }
}

// ===== impl PropagateContextLayer =====

impl PropagateContextLayer {
    /// A layer whose new traces (when the caller sent no valid `traceparent`) are sampled.
    ///
    /// ```
    /// let layer = contextflow_http::PropagateContextLayer::new();
    /// # drop(layer);
    /// ```
    pub fn new() -> Self {
        PropagateContextLayer {
            sample_new_traces: true,
        }
    }

    /// Sets the *sampled* flag of the traces this service starts (default `true`). A
    /// continued trace keeps the caller's flags.
    ///
    /// ```
    /// let layer = contextflow_http::PropagateContextLayer::new().sample_new_traces(false);
    /// # drop(layer);
    /// ```
    pub fn sample_new_traces(mut self, sampled: bool) -> Self {
        self.sample_new_traces = sampled;
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
            sample_new_traces: self.sample_new_traces,
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
    /// let layer = contextflow_http::PropagateContext::<()>::layer();
    /// # drop(layer);
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
        let trace_context = match req.extensions().get::<TraceContext>() {
            Some(set_earlier) => set_earlier.clone(),
            None => extract_trace_context(req.headers(), self.sample_new_traces),
        };
        let request_id = match req.extensions().get::<RequestId>() {
            Some(set_earlier) => set_earlier.clone(),
            None => extract_request_id(req.headers()),
        };
        let baggage = extract_baggage(req.headers());

        let id_value = request_id.header_value().clone();
        if req.headers().get(X_REQUEST_ID) != Some(&id_value) {
            // Missing, malformed, repeated, or not what an earlier layer chose: one clean value.
            req.headers_mut().insert(X_REQUEST_ID, id_value.clone());
        }
        req.extensions_mut().insert(request_id.clone());
        req.extensions_mut().insert(trace_context.clone());

        let snapshot = IncomingContext::new(trace_context, request_id, baggage).into_snapshot();
        // `call` itself runs in the context too: layers such as `TraceLayer` make their span here.
        let inner = snapshot.run(|| self.inner.call(req));
        ResponseFuture {
            inner: inner.with_snapshot(snapshot.clone()),
            snapshot: Some(snapshot),
            request_id: Some(id_value),
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
        let result = ready!(this.inner.poll(cx));
        // Taken once, when the inner future completes; a future is not polled again after that.
        let snapshot = this.snapshot.take().unwrap_or_else(Snapshot::empty);
        let request_id = this.request_id.take();
        Poll::Ready(result.map(|mut res| {
            if let Some(id) = request_id {
                // Never override a request id the handler chose.
                res.headers_mut().entry(X_REQUEST_ID).or_insert(id);
            }
            res.map(|body| ContextBody::new(body, snapshot))
        }))
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
    /// let body = contextflow_http::ContextBody::new(String::new(), Snapshot::empty());
    /// assert_eq!(body.get_ref().map(String::len), Some(0));
    /// ```
    pub fn new(body: B, snapshot: Snapshot) -> Self {
        ContextBody {
            snapshot,
            inner: Some(body),
        }
    }

    /// The wrapped body (`None` never happens outside `Drop`).
    ///
    /// ```
    /// use contextflow::Snapshot;
    /// let body = contextflow_http::ContextBody::new(7, Snapshot::empty());
    /// assert_eq!(body.get_ref(), Some(&7));
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
        &self.snapshot
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
        match this.inner.as_pin_mut() {
            Some(inner) => this.snapshot.run(|| inner.poll_frame(cx)),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Some(inner) => self.snapshot.run(|| inner.is_end_stream()),
            None => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) => self.snapshot.run(|| inner.size_hint()),
            None => SizeHint::with_exact(0),
        }
    }
}

impl<B> fmt::Debug for ContextBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextBody")
            .field("snapshot", &self.snapshot)
            .finish_non_exhaustive()
    }
}
