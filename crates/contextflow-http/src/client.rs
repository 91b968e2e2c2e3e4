//! Client middleware: [`InjectContextLayer`] writes the current context into outgoing requests.
//!
//! Each request gets `traceparent` (the current trace id and flags with a new span id),
//! `tracestate`, `baggage` and `x-request-id`, read when the request is handed to the service
//! (in `call`); see [`inject_headers`] for the rules. Headers the
//! caller set are left alone. Call it from the request's task, or from a task started with
//! `contextflow::spawn`, which inherits the context; a plain `tokio::spawn` does not.
//!
//! ```
//! use contextflow_http::{InjectContextLayer, RequestId, REQUEST_ID};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Any tower HTTP client works; this one echoes the request id it was sent.
//! let client = ServiceBuilder::new()
//!     .layer(InjectContextLayer::new())
//!     .service(service_fn(|req: http::Request<()>| async move {
//!         Ok::<_, std::convert::Infallible>(req.headers()["x-request-id"].clone())
//!     }));
//!
//! let id: RequestId = "req-9".parse()?;
//! let sent = REQUEST_ID
//!     .scope(id, async {
//!         // The spawned task inherits the request id.
//!         contextflow::spawn(client.oneshot(http::Request::new(()))).await
//!     })
//!     .await??;
//! assert_eq!(sent, "req-9");
//! # Ok(())
//! # }
//! ```

use std::task::{Context, Poll};

use http::Request;
use tower_layer::Layer;
use tower_service::Service;

use crate::inject_headers;

/// A [`Layer`] that wraps HTTP clients in [`InjectContext`].
///
/// ```
/// use contextflow_http::InjectContextLayer;
/// use tower::ServiceBuilder;
///
/// let client = ServiceBuilder::new()
///     .layer(InjectContextLayer::new())
///     .service_fn(|_req: http::Request<()>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(()))
///     });
/// # drop(client);
/// ```
#[derive(Clone, Debug, Default)]
pub struct InjectContextLayer {
    _private: (),
}

/// Middleware that writes the current context into each outgoing request's headers.
///
/// ```
/// use contextflow_http::{InjectContext, TraceContext, TRACE_CONTEXT};
/// use tower::{service_fn, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let client = InjectContext::new(service_fn(|req: http::Request<()>| async move {
///     Ok::<_, std::convert::Infallible>(req.headers().get("traceparent").cloned())
/// }));
/// let ctx = TraceContext::new_trace(true);
/// let sent = TRACE_CONTEXT.scope(ctx.clone(), client.oneshot(http::Request::new(()))).await?;
/// let sent: contextflow_http::TraceParent = sent.unwrap().to_str()?.parse()?;
/// assert_eq!(sent.trace_id(), ctx.trace_id());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct InjectContext<S> {
    inner: S,
}

// ===== impl InjectContextLayer =====

impl InjectContextLayer {
    /// A new layer.
    ///
    /// ```
    /// let layer = contextflow_http::InjectContextLayer::new();
    /// # drop(layer);
    /// ```
    pub fn new() -> Self {
        InjectContextLayer { _private: () }
    }
}

impl<S> Layer<S> for InjectContextLayer {
    type Service = InjectContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InjectContext { inner }
    }
}

// ===== impl InjectContext =====

impl<S> InjectContext<S> {
    /// Wraps `inner`.
    ///
    /// ```
    /// let client = contextflow_http::InjectContext::new(7);
    /// assert_eq!(*client.get_ref(), 7);
    /// ```
    pub fn new(inner: S) -> Self {
        InjectContext { inner }
    }

    /// The inner service.
    ///
    /// ```
    /// assert_eq!(*contextflow_http::InjectContext::new(1).get_ref(), 1);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    ///
    /// ```
    /// let mut client = contextflow_http::InjectContext::new(1);
    /// *client.get_mut() = 2;
    /// assert_eq!(client.into_inner(), 2);
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    ///
    /// ```
    /// assert_eq!(contextflow_http::InjectContext::new(1).into_inner(), 1);
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for InjectContext<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        inject_headers(req.headers_mut());
        self.inner.call(req)
    }
}
