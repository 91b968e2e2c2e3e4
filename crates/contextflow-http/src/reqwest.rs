//! A `reqwest-middleware` middleware that writes the current context into outgoing requests
//! (feature `reqwest`).

use http::Extensions;
use reqwest_middleware::{Middleware, Next, Result};

use crate::inject_headers;

/// Writes `traceparent` (new span id, same trace id), `tracestate`, `baggage` and
/// `x-request-id` from the current context into each request sent through a
/// [`reqwest_middleware::ClientWithMiddleware`]; headers set on the request builder are left
/// alone (see [`inject_headers`]).
///
/// The context is read when the `send` future is first polled, in the task that polls it:
/// the request's own task, or one started with `contextflow::spawn`.
///
/// ```
/// use contextflow_http::InjectContextMiddleware;
/// use reqwest_middleware::ClientBuilder;
///
/// let client = ClientBuilder::new(reqwest::Client::new())
///     .with(InjectContextMiddleware::new())
///     .build();
/// # drop(client);
/// ```
#[derive(Clone, Debug, Default)]
pub struct InjectContextMiddleware {
    _private: (),
}

impl InjectContextMiddleware {
    /// A new middleware.
    ///
    /// ```
    /// let middleware = contextflow_http::InjectContextMiddleware::new();
    /// # drop(middleware);
    /// ```
    pub fn new() -> Self {
        InjectContextMiddleware { _private: () }
    }
}

#[async_trait::async_trait]
impl Middleware for InjectContextMiddleware {
    async fn handle(
        &self,
        mut req: ::reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> Result<::reqwest::Response> {
        inject_headers(req.headers_mut());
        next.run(req, extensions).await
    }
}
