//! Client middleware: [`InjectContextLayer`] writes the current context into outgoing requests.
//!
//! Each request gets what the configured propagation writes (the global propagator by
//! default: `traceparent` naming the *current span* as parent, `tracestate`, `baggage`) and
//! `x-request-id`, read when the request is handed to the service (in `call`). The current
//! span is OpenTelemetry's current one: the server span of the request, a span the handler
//! started, or a `tracing` span bridged by `tracing-opentelemetry`. With a tracer
//! ([`InjectContextLayer::with_tracer`]), the layer starts a *client* span for each request
//! and names it as the parent instead. Headers the caller set are left alone (see
//! [`HeaderInjector`]); a request that already carries a `traceparent` gets no client span
//! (it would be the parent of nothing). Call it from the request's task, or from a task
//! started with `contextflow::spawn`, which inherits the context; a plain `tokio::spawn` does
//! not. Place retry and redirect-following layers *outside* (before) this one: each attempt
//! then gets a client span and a parent id of its own, where below it every attempt
//! re-sends the same headers under one span.
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
//!         let id = req.headers()["x-request-id"].clone();
//!         Ok::<_, std::convert::Infallible>(http::Response::new(id))
//!     }));
//!
//! let id: RequestId = "req-9".parse()?;
//! let sent = REQUEST_ID
//!     .scope(id, async {
//!         // The spawned task inherits the request id.
//!         contextflow::spawn(client.oneshot(http::Request::new(()))).await
//!     })
//!     .await??;
//! assert_eq!(sent.body(), "req-9");
//! # Ok(())
//! # }
//! ```

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use contextflow_otel::Propagation;
use http::Request;
use opentelemetry::{propagation::TextMapPropagator, trace::SpanKind, KeyValue};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    spans::{self, Spans},
    HeaderInjector,
};

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
#[derive(Clone, Debug)]
pub struct InjectContextLayer {
    propagation: Propagation,
    spans: Spans,
    baggage_to: BaggageTo,
}

/// Which destinations get the `baggage` header: all (the default), or those a predicate on the
/// request's URI accepts.
#[derive(Clone, Default)]
pub(crate) struct BaggageTo(Option<Arc<UriFilter>>);

/// A predicate on a request's URI.
type UriFilter = dyn Fn(&http::Uri) -> bool + Send + Sync;

impl BaggageTo {
    pub(crate) fn new(allow: impl Fn(&http::Uri) -> bool + Send + Sync + 'static) -> Self {
        BaggageTo(Some(Arc::new(allow)))
    }

    /// Whether a request to `uri` gets the baggage. Host names compare without regard to case
    /// and to one trailing dot (RFC 3986; `partner.example.` is `partner.example` in DNS): the
    /// predicate sees the authority in lower case, as `reqwest`'s URLs have it, and without the
    /// dot, so `PARTNER.example` or `partner.example.` cannot get past a check for
    /// `partner.example`. With a filter, a URI without a host (a tonic channel's requests: the
    /// channel adds the host below the layers) gets none, as does one that cannot be rebuilt.
    pub(crate) fn allows(&self, uri: &http::Uri) -> bool {
        let Some(allow) = &self.0 else {
            return true;
        };
        let Some(authority) = uri.authority() else {
            return false;
        };
        let host = authority.host();
        let upper = authority.as_str().bytes().any(|b| b.is_ascii_uppercase());
        let dot = host.len() > 1 && host.ends_with('.');
        if !upper && !dot {
            return allow(uri);
        }
        let mut text = authority.as_str().to_ascii_lowercase();
        if dot {
            // `[userinfo@]host[:port]`: userinfo has no unescaped `@`.
            let start = text.rfind('@').map_or(0, |at| at + 1);
            text.remove(start + host.len() - 1);
        }
        let mut parts = uri.clone().into_parts();
        parts.authority = http::uri::Authority::try_from(text).ok();
        parts.authority.is_some() && http::Uri::from_parts(parts).is_ok_and(|uri| allow(&uri))
    }

    /// [`allows`](Self::allows) for a request that may carry a `Host` header: with a filter,
    /// the host it names must pass too (a gateway at the URI's host forwards by `Host`), and
    /// more than one, or one that is not an authority, gets no baggage.
    pub(crate) fn allows_request(&self, uri: &http::Uri, headers: &http::HeaderMap) -> bool {
        if self.0.is_none() {
            return true;
        }
        if !self.allows(uri) {
            return false;
        }
        let mut hosts = headers.get_all(http::header::HOST).iter();
        let Some(host) = hosts.next() else {
            return true;
        };
        if hosts.next().is_some() {
            return false;
        }
        let Ok(authority) = http::uri::Authority::try_from(host.as_bytes()) else {
            return false;
        };
        let mut parts = uri.clone().into_parts();
        parts.authority = Some(authority);
        http::Uri::from_parts(parts).is_ok_and(|named| self.allows(&named))
    }

    /// Whether a filter is set.
    #[cfg_attr(not(feature = "reqwest"), allow(dead_code))]
    pub(crate) fn is_filtered(&self) -> bool {
        self.0.is_some()
    }
}

impl fmt::Debug for BaggageTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "filtered"
        } else {
            "everywhere"
        })
    }
}

/// Middleware that writes the current context into each outgoing request's headers.
///
/// ```
/// use contextflow_http::InjectContext;
/// use contextflow_otel::carrier::Pairs;
/// use tower::{service_fn, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let client = InjectContext::new(service_fn(|req: http::Request<()>| async move {
///     Ok::<_, std::convert::Infallible>(http::Response::new(req.headers()["traceparent"].clone()))
/// }));
/// let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// let cx = contextflow_otel::extract(&Pairs::new([("traceparent", tp)]));
/// let sent = contextflow_otel::scope(cx, client.oneshot(http::Request::new(()))).await?;
/// assert_eq!(sent.body(), tp, "no span of ours: the current span is the parent");
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct InjectContext<S> {
    inner: S,
    propagation: Propagation,
    spans: Spans,
    baggage_to: BaggageTo,
}

pin_project! {
    /// The response future of [`InjectContext`]: ends the client span, if any, when the
    /// response arrives (or the call fails or is dropped).
    pub struct ClientFuture<F> {
        #[pin]
        inner: F,
        span: Option<opentelemetry::Context>,
    }

    impl<F> PinnedDrop for ClientFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(cx) = this.project().span.take() {
                spans::end_with_error(&cx, "cancelled");
            }
        }
    }
}

// ===== impl InjectContextLayer =====

impl InjectContextLayer {
    /// A layer with the global propagation and no client span.
    ///
    /// ```
    /// let layer = contextflow_http::InjectContextLayer::new();
    /// # drop(layer);
    /// ```
    pub fn new() -> Self {
        InjectContextLayer {
            propagation: Propagation::global(),
            spans: Spans::Off,
            baggage_to: BaggageTo::default(),
        }
    }

    /// Uses `propagator` (B3, Jaeger, Datadog, a composite...) instead of the global one; the
    /// request id is written in any case.
    ///
    /// ```
    /// let layer = contextflow_http::InjectContextLayer::new()
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

    /// Starts a client span with `tracer` for each request, a child of the current span.
    ///
    /// ```
    /// use opentelemetry::trace::TracerProvider as _;
    /// let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    /// let layer = contextflow_http::InjectContextLayer::new().with_tracer(provider.tracer("svc"));
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

    /// Starts client spans with the global `TracerProvider`'s tracer (read at the first
    /// request).
    ///
    /// ```
    /// let layer = contextflow_http::InjectContextLayer::new().with_global_tracer();
    /// # drop(layer);
    /// ```
    pub fn with_global_tracer(mut self) -> Self {
        self.spans = Spans::global();
        self
    }

    /// Writes the `baggage` header only into requests whose URI `allow` accepts: the W3C
    /// Baggage specification asks that baggage not leak beyond the system's trust boundary,
    /// and it carries whatever the callers upstream put in it. The default writes it into
    /// every request, as OpenTelemetry's propagators do. The trace context and the request id
    /// are written in any case.
    ///
    /// A request `allow` refuses leaves with no `baggage` header at all: one the caller put on
    /// it (copied from the incoming request, say) is removed too. `allow` sees the authority
    /// in lower case and without a trailing dot; prefer an allow-list (hosts that may have the
    /// baggage) to a deny-list. A request without a host gets no baggage when a filter is set:
    /// tonic's `Channel` adds the host below the layers, so its requests carry only a path;
    /// give each channel's stack its own layer, with or without baggage. A request with a
    /// `Host` header gets the baggage only if the host it names passes too (a gateway at the
    /// URI's host forwards by `Host`). Redirects: put
    /// tower-http's `FollowRedirectLayer` outside this layer (so each hop is judged by its own
    /// URI), or follow only same-host redirects; a redirect followed below this layer re-sends
    /// the first request's headers to the new host.
    ///
    /// ```
    /// use http::Uri;
    /// use tower::{Layer as _, ServiceExt as _};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let layer = contextflow_http::InjectContextLayer::new().baggage_only_to(|uri| {
    ///     uri.host().is_some_and(|host| host.ends_with(".internal"))
    /// });
    /// let svc = layer.layer(tower::service_fn(|req: http::Request<()>| async move {
    ///     let sent = req.headers().contains_key("baggage");
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(sent))
    /// }));
    /// let sent = |uri: &'static str| {
    ///     let mut req = http::Request::new(());
    ///     *req.uri_mut() = Uri::from_static(uri);
    ///     // Copied from an incoming request, say.
    ///     req.headers_mut().insert("baggage", "user=alice".parse().unwrap());
    ///     svc.clone().oneshot(req)
    /// };
    /// assert!(sent("http://orders.internal/").await.unwrap().into_body());
    /// assert!(!sent("https://api.partner.example/").await.unwrap().into_body());
    /// assert!(!sent("/pkg.Service/Method").await.unwrap().into_body(), "no host: none");
    /// # }
    /// ```
    pub fn baggage_only_to<F>(mut self, allow: F) -> Self
    where
        F: Fn(&http::Uri) -> bool + Send + Sync + 'static,
    {
        self.baggage_to = BaggageTo::new(allow);
        self
    }
}

impl Default for InjectContextLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for InjectContextLayer {
    type Service = InjectContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InjectContext {
            inner,
            propagation: self.propagation.clone(),
            spans: self.spans.clone(),
            baggage_to: self.baggage_to.clone(),
        }
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
        InjectContextLayer::new().layer(inner)
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

impl<S, B, ResB> Service<Request<B>> for InjectContext<S>
where
    S: Service<Request<B>, Response = http::Response<ResB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ClientFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let current = contextflow_otel::current_context();
        // A request whose caller set `traceparent` keeps it (see `HeaderInjector`): a client
        // span of ours would be the parent of nothing, so none is started.
        let span = if crate::headers::caller_traceparent(req.headers_mut()) {
            None
        } else {
            self.spans.start(
                SpanKind::Client,
                req.method(),
                || spans::grpc_call(req.method(), req.headers(), req.uri()),
                &current,
                |attrs| client_attributes(req.uri(), attrs),
            )
        };
        let cx = span.as_ref().unwrap_or(&current);
        let skip_baggage = !self.baggage_to.allows_request(req.uri(), req.headers());
        self.propagation.inject(
            cx,
            &mut HeaderInjector::new(req.headers_mut()).without_baggage(skip_baggage),
        );
        ClientFuture {
            inner: self.inner.call(req),
            span,
        }
    }
}

impl<F, ResB, E> Future for ClientFuture<F>
where
    F: Future<Output = Result<http::Response<ResB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(span) = this.span.take() {
            let answer = result
                .as_ref()
                .ok()
                .map(|res| (res.status(), res.headers()));
            spans::end_client(&span, answer);
        }
        Poll::Ready(result)
    }
}

impl<F> fmt::Debug for ClientFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientFuture").finish_non_exhaustive()
    }
}

/// `server.address`, `server.port` and `url.full` of an outgoing request.
pub(crate) fn client_attributes(uri: &http::Uri, attrs: &mut Vec<KeyValue>) {
    if let Some(host) = uri.host() {
        // An IPv6 literal without its URL brackets, as the conventions give it (`::1`).
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        attrs.push(KeyValue::new("server.address", host.to_owned()));
    }
    // Required: also when the URL leaves the scheme's default port out (reqwest's always do).
    let port = uri.port_u16().or_else(|| match uri.scheme_str() {
        Some(scheme) if scheme.eq_ignore_ascii_case("https") => Some(443),
        Some(scheme) if scheme.eq_ignore_ascii_case("http") => Some(80),
        _ => None,
    });
    if let Some(port) = port {
        attrs.push(KeyValue::new("server.port", i64::from(port)));
    }
    attrs.push(KeyValue::new("url.full", url_full(uri)));
}

/// The request's URL without credentials: the semantic conventions' `url.full` must not carry
/// a `user:password@`, and give `REDACTED:REDACTED@` in its place; the values of the query
/// keys they name as secrets by default ([`REDACTED_QUERY_KEYS`]: presigned-URL signatures
/// and access keys) become `REDACTED` too.
fn url_full(uri: &http::Uri) -> String {
    let mut full = uri.to_string();
    if let Some(authority) = uri.authority().map(http::uri::Authority::as_str) {
        if let Some((_, host)) = authority.rsplit_once('@') {
            full = full.replacen(authority, &format!("REDACTED:REDACTED@{host}"), 1);
        }
    }
    let Some(query) = uri.query() else {
        return full;
    };
    let secret = |pair: &str| {
        let key = pair.split_once('=').map_or(pair, |(key, _)| key);
        pair.contains('=') && REDACTED_QUERY_KEYS.contains(&key)
    };
    if !query.split('&').any(secret) {
        return full;
    }
    let redacted: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if secret(pair) => format!("{key}=REDACTED"),
            _ => pair.to_owned(),
        })
        .collect();
    // The query is the URL's end (`http::Uri` keeps no fragment).
    let start = full.len() - query.len();
    full.truncate(start);
    full.push_str(&redacted.join("&"));
    full
}

/// Query keys whose values `url.full` never carries (the semantic conventions' default list).
const REDACTED_QUERY_KEYS: [&str; 4] = ["AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature"];

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding: an IPv6 literal kept its URL brackets in `server.address`.
    #[test]
    fn server_address_of_an_ipv6_literal_has_no_brackets() {
        let address = |uri: &str| {
            let mut attrs = Vec::new();
            client_attributes(&uri.parse().unwrap(), &mut attrs);
            attrs
                .into_iter()
                .find(|kv| kv.key.as_str() == "server.address")
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(address("http://[::1]:8080/").as_deref(), Some("::1"));
        assert_eq!(
            address("https://[2001:db8::7]/x").as_deref(),
            Some("2001:db8::7")
        );
        assert_eq!(
            address("http://pay.example/").as_deref(),
            Some("pay.example")
        );
        assert_eq!(address("http://127.0.0.1:9/").as_deref(), Some("127.0.0.1"));
    }

    #[test]
    fn url_full_never_carries_credentials() {
        let attrs = |uri: &str| {
            let mut attrs = Vec::new();
            client_attributes(&uri.parse().unwrap(), &mut attrs);
            attrs
                .into_iter()
                .find(|kv| kv.key.as_str() == "url.full")
                .map(|kv| kv.value.to_string())
                .unwrap()
        };
        assert_eq!(
            attrs("https://alice:s3cret@pay.example:8443/v1/charge?x=1"),
            "https://REDACTED:REDACTED@pay.example:8443/v1/charge?x=1"
        );
        assert_eq!(
            attrs("http://token@pay.example/"),
            "http://REDACTED:REDACTED@pay.example/"
        );
        assert_eq!(
            attrs("http://pay.example/a?b=c"),
            "http://pay.example/a?b=c"
        );
        assert_eq!(attrs("/relative"), "/relative");
        assert_eq!(
            attrs("https://bucket.s3.example/k?AWSAccessKeyId=AKIA&Expires=1&Signature=abc%2Bd"),
            "https://bucket.s3.example/k?AWSAccessKeyId=REDACTED&Expires=1&Signature=REDACTED"
        );
        assert_eq!(
            attrs("https://u:p@h.example/a?sig=x&X-Goog-Signature=y&keep=sig&Sig=z&sig"),
            "https://REDACTED:REDACTED@h.example/a?sig=REDACTED&X-Goog-Signature=REDACTED&keep=sig&Sig=z&sig"
        );
    }
}
