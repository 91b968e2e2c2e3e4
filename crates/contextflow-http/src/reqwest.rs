//! A `reqwest-middleware` middleware that writes the current context into outgoing requests
//! (feature `reqwest`).

use contextflow_otel::Propagation;
use http::Extensions;
use opentelemetry::{propagation::TextMapPropagator, trace::SpanKind};
use reqwest_middleware::{Middleware, Next, Result};

use crate::{
    client::client_attributes,
    spans::{self, Spans},
    HeaderInjector,
};

/// Writes the current context into each request sent through a
/// [`reqwest_middleware::ClientWithMiddleware`], as
/// [`InjectContextLayer`](crate::InjectContextLayer) does: what the propagation writes
/// (`traceparent` naming the current span, `tracestate`, `baggage`) and `x-request-id`;
/// headers set on the request builder are left alone. With a tracer, a client span per
/// request.
///
/// The context is read when the `send` future is first polled, in the task that polls it:
/// the request's own task, or one started with `contextflow::spawn`.
///
/// One client span and one `traceparent` cover whatever happens below the middleware: put a
/// retry middleware (`reqwest-retry`) *before* this one in the chain, so that each attempt
/// gets a span and a parent id of its own (after it, every attempt re-sends the same
/// headers under one span); reqwest's own redirects are followed below any middleware, so
/// the hops of a redirect share the first request's span, whose `url.full` and
/// `server.address` name the first URL.
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
#[derive(Clone, Debug)]
pub struct InjectContextMiddleware {
    propagation: Propagation,
    spans: Spans,
    baggage_to: crate::client::BaggageTo,
}

impl InjectContextMiddleware {
    /// A middleware with the global propagation and no client span.
    ///
    /// ```
    /// let middleware = contextflow_http::InjectContextMiddleware::new();
    /// # drop(middleware);
    /// ```
    pub fn new() -> Self {
        InjectContextMiddleware {
            propagation: Propagation::global(),
            spans: Spans::Off,
            baggage_to: crate::client::BaggageTo::default(),
        }
    }

    /// Uses `propagator` instead of the global one; the request id is written in any case.
    ///
    /// ```
    /// let middleware = contextflow_http::InjectContextMiddleware::new()
    ///     .with_propagator(contextflow_otel::TraceContextPropagator::new());
    /// # drop(middleware);
    /// ```
    pub fn with_propagator<P>(mut self, propagator: P) -> Self
    where
        P: TextMapPropagator + Send + Sync + 'static,
    {
        self.propagation = Propagation::with_propagator(propagator);
        self
    }

    /// Starts a client span with `tracer` for each request, a child of the current span.
    ///
    /// ```
    /// use opentelemetry::trace::TracerProvider as _;
    /// let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    /// let middleware = contextflow_http::InjectContextMiddleware::new().with_tracer(provider.tracer("svc"));
    /// # drop(middleware);
    /// ```
    pub fn with_tracer<T>(mut self, tracer: T) -> Self
    where
        T: opentelemetry::trace::Tracer + Send + Sync + 'static,
        T::Span: Send + Sync + 'static,
    {
        self.spans = Spans::tracer(tracer);
        self
    }

    /// Starts client spans with the global `TracerProvider`'s tracer.
    ///
    /// ```
    /// let middleware = contextflow_http::InjectContextMiddleware::new().with_global_tracer();
    /// # drop(middleware);
    /// ```
    pub fn with_global_tracer(mut self) -> Self {
        self.spans = Spans::global();
        self
    }

    /// Writes the `baggage` header only into requests whose URI `allow` accepts (see
    /// [`InjectContextLayer::baggage_only_to`](crate::InjectContextLayer::baggage_only_to)).
    /// reqwest follows redirects below the middleware, with the first request's headers
    /// (`baggage` included) and only the credentials removed on a change of host: with a
    /// filter, give the client [`redirect_policy`](Self::redirect_policy) too, or a 302 from
    /// an allowed host to another one carries the baggage there.
    ///
    /// ```
    /// let middleware = contextflow_http::InjectContextMiddleware::new()
    ///     .baggage_only_to(|uri| uri.host() == Some("orders.internal"));
    /// # drop(middleware);
    /// ```
    pub fn baggage_only_to<F>(mut self, allow: F) -> Self
    where
        F: Fn(&http::Uri) -> bool + Send + Sync + 'static,
    {
        self.baggage_to = crate::client::BaggageTo::new(allow);
        self
    }
}

impl InjectContextMiddleware {
    /// A redirect policy for the `reqwest::Client` under this middleware that follows a
    /// redirect (at most 10, as reqwest's default) of a request that carried baggage only to
    /// a URL the [`baggage_only_to`](Self::baggage_only_to) filter accepts; a redirect
    /// elsewhere is not followed: the caller gets the `3xx` answer (its `Location` says where),
    /// and decides. The redirects of a request whose URL the filter refused (no baggage) are
    /// followed anywhere. The policy sees URLs only: a request to an accepted URL counts as
    /// carrying baggage even when it carried none (none in its context, or refused by its
    /// `Host` header), so its redirects elsewhere stop too, on the safe side. Without a
    /// filter, reqwest's default.
    ///
    /// ```
    /// use contextflow_http::InjectContextMiddleware;
    /// use reqwest_middleware::ClientBuilder;
    ///
    /// let middleware = InjectContextMiddleware::new()
    ///     .baggage_only_to(|uri| uri.host().is_some_and(|h| h.ends_with(".internal")));
    /// let client = reqwest::Client::builder()
    ///     .redirect(middleware.redirect_policy())
    ///     .build()?;
    /// let client = ClientBuilder::new(client).with(middleware).build();
    /// # drop(client);
    /// # Ok::<(), reqwest::Error>(())
    /// ```
    pub fn redirect_policy(&self) -> ::reqwest::redirect::Policy {
        if !self.baggage_to.is_filtered() {
            return ::reqwest::redirect::Policy::default();
        }
        let baggage_to = self.baggage_to.clone();
        let allows = move |url: &::reqwest::Url| {
            http::Uri::try_from(url.as_str()).is_ok_and(|uri| baggage_to.allows(&uri))
        };
        ::reqwest::redirect::Policy::custom(move |attempt| {
            // `previous` holds the first URL too; reqwest's default stops past 10.
            if attempt.previous().len() > 10 {
                return attempt.error("too many redirects");
            }
            // A first request the filter refused carried no baggage: its redirects are
            // followed anywhere (an `http` to `https` hop of a third-party API, say).
            let carried = attempt.previous().first().is_some_and(&allows);
            if !carried || allows(attempt.url()) {
                attempt.follow()
            } else {
                attempt.stop()
            }
        })
    }
}

impl Default for InjectContextMiddleware {
    fn default() -> Self {
        Self::new()
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
        let current = contextflow_otel::current_context();
        let uri = http::Uri::try_from(req.url().as_str());
        // A caller-set `traceparent` is kept (see `HeaderInjector`): no span of ours, which
        // would be the parent of nothing.
        let span = match &uri {
            _ if crate::headers::caller_traceparent(req.headers_mut()) => None,
            Ok(uri) => self.spans.start(
                SpanKind::Client,
                req.method(),
                || None,
                &current,
                |attrs| client_attributes(uri, attrs),
            ),
            Err(_) => self
                .spans
                .start(SpanKind::Client, req.method(), || None, &current, |_| {}),
        };
        let cx = span.as_ref().unwrap_or(&current);
        // A URL `http` cannot read gets no baggage when a filter is set.
        let skip_baggage = match &uri {
            Ok(uri) => !self.baggage_to.allows_request(uri, req.headers()),
            Err(_) => self.baggage_to.is_filtered(),
        };
        self.propagation.inject(
            cx,
            &mut HeaderInjector::new(req.headers_mut()).without_baggage(skip_baggage),
        );
        // Ends the span as `cancelled` if this future is dropped before the answer (a timeout
        // around the call), as the tower client layer does.
        let mut guard = CancelledSpan(span);
        let result = next.run(req, extensions).await;
        if let Some(span) = guard.0.take() {
            let answer = result
                .as_ref()
                .ok()
                .map(|res| (res.status(), res.headers()));
            spans::end_client(&span, answer);
        }
        result
    }
}

/// A client span still open when the call's future is dropped: ended as `cancelled`.
struct CancelledSpan(Option<opentelemetry::Context>);

impl Drop for CancelledSpan {
    fn drop(&mut self) {
        if let Some(span) = self.0.take() {
            spans::end_with_error(&span, "cancelled");
        }
    }
}
