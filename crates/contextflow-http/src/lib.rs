//! Tower server and client layers that carry [`contextflow`]'s request context across HTTP
//! (and gRPC, which runs on HTTP/2 through the same layers), with OpenTelemetry propagation and
//! spans.
//!
//! Inside a process, `contextflow` carries request context through `.await`, spawned tasks and
//! threads by itself. Across a process boundary only what a propagator writes travels: the
//! trace context, baggage and the request id. This crate is the HTTP transport; the trace
//! model, the propagators and the carriers are `contextflow-otel`'s.
//!
//! - **Server**: [`PropagateContextLayer`] extracts the caller's context with the configured
//!   propagator (OpenTelemetry's global one by default, so B3, Jaeger or Datadog work by
//!   configuration), starts a real server span whose parent is the caller's span, and runs
//!   the handler, the response body and their destructors inside it. It echoes the request id
//!   on the response.
//! - **Client**: [`InjectContextLayer`] (any tower HTTP client, tonic's channel included) and
//!   `InjectContextMiddleware` (`reqwest-middleware`, feature `reqwest`) write the current
//!   context into outgoing requests: the current span (or a client span of their own) as
//!   `parent-id`.
//! - **Anywhere**: [`current_trace_id`], [`current_span_id`], [`current_request_id`] read the
//!   context from any code that runs for the request, including tasks started with
//!   `contextflow::spawn`.
//!
//! # Server setup (axum)
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use contextflow_http::PropagateContextLayer;
//!
//! async fn handler() -> String {
//!     // No request object needed: the context follows the code.
//!     let request_id = contextflow_http::current_request_id().unwrap();
//!     format!("request {request_id} in trace {:?}", contextflow_http::current_trace_id())
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> std::io::Result<()> {
//! // Install an OpenTelemetry SDK tracer provider (with an exporter) for real spans.
//! let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
//!     .with_id_generator(contextflow_otel::SecureIdGenerator::default())
//!     .build();
//! opentelemetry::global::set_tracer_provider(provider);
//! let app = Router::new()
//!     .route("/", get(handler))
//!     .layer(PropagateContextLayer::new());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! Put it outside tower-http's `TraceLayer` so the request span sees the ids, and bind the
//! tenant and the user in an inner, authenticating layer: see the [`server`] module.
//!
//! # Client setup
//!
//! With `reqwest` (feature `reqwest`):
//!
//! ```
//! use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
//!
//! let client = ClientBuilder::new(reqwest::Client::new())
//!     .with(contextflow_http::InjectContextMiddleware::new())
//!     .build();
//!
//! // Called inside a request, or in a task started with `contextflow::spawn` from one.
//! async fn list_items(client: &ClientWithMiddleware) -> reqwest_middleware::Result<String> {
//!     Ok(client.get("http://inventory/items").send().await?.text().await?)
//! }
//! # let _ = list_items;
//! # drop(client);
//! ```
//!
//! With any tower client:
//!
//! ```
//! use contextflow_http::InjectContextLayer;
//! use tower::ServiceBuilder;
//!
//! let client = ServiceBuilder::new()
//!     .layer(InjectContextLayer::new())
//!     .service_fn(|req: http::Request<String>| async move {
//!         // hyper, a test double, ...: `req` now carries the context's headers.
//!         let _headers = req.headers();
//!         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//!     });
//! # drop(client);
//! ```
//!
//! For other transports that carry HTTP-style headers, use [`extract_headers`] and
//! [`inject_headers`]; for any string-keyed metadata, `contextflow_otel::carrier`.
//!
//! # Headers and limits
//!
//! With the default propagation (no global propagator installed):
//!
//! | header | read as | written as | bounds |
//! |---|---|---|---|
//! | `traceparent` | `contextflow_otel::TraceParent`: version `00` exactly, future versions leniently; lower-case hex; no all-zero id; one header only | version `00`, the current span's id, known flags only | 55 characters |
//! | `tracestate` | `contextflow_otel::TraceState`: the current W3C key grammar; dropped whole when malformed or with more than 32 members; a repeated key keeps its first member; dropped when `traceparent` is invalid | as received, in order | 32 members, 512 characters (members over 128 characters dropped first, then from the end) |
//! | `baggage` | `contextflow_otel::Baggage`: values and property values percent-decoded, malformed members dropped | percent-encoded | 64 members, 8,192 bytes |
//! | `x-request-id` | `contextflow_otel::RequestId`: 1 to 128 bytes of visible ASCII, else a new UUID v4 | echoed on the response (unless the handler set one) and forwarded | 128 bytes |
//!
//! # Security
//!
//! Headers come from the client and are untrusted. Every value is validated and bounded
//! before it enters the context; a malformed one is dropped with a `debug` log and a fresh one
//! made. Parsing never panics (property-tested). Log lines never show a raw value: it is
//! ASCII-escaped and cut to 64 bytes, and errors name the rule that failed, not the value.
//! This crate never sets a tenant or a user, and baggage must not be used for either: they
//! come from authenticated code only.
//!
//! Outgoing, the client layer and the reqwest middleware write the baggage that came in (plus
//! what the service added) into every request, as OpenTelemetry's propagators do. Baggage
//! must not leak beyond the system's trust boundary (W3C Baggage, "Privacy Considerations"):
//! for a client that also calls third parties, restrict it with `baggage_only_to` (a predicate
//! on the request's URI); the trace context and the request id still go. A request the
//! predicate refuses leaves with no `baggage` at all, also one the handler copied from the
//! incoming request; with a filter, a request without a host (tonic's channels add it below
//! the layers) gets none. The handler sees the incoming propagation headers as they came
//! (only `x-request-id` is replaced): copying them onto an outgoing request forwards them
//! unchecked; let the client layer write them instead.
//!
//! Where the client layer goes: outside tower-http's `FollowRedirectLayer` (each hop judged by
//! its own URI; a redirect followed below the layer re-sends the first request's headers,
//! baggage included, to the new host, and tower-http's `FilterCredentials` does not strip
//! them), and outside any layer that moves `call` to a task of its own (tower's `Buffer`): the
//! layer reads the context of the task that calls it, so below a `Buffer` it would write the
//! context of the buffer's worker task, not the caller's. Build such clients outside any
//! request.
//!
//! # Features
//!
//! - `reqwest` (off by default): `InjectContextMiddleware` for `reqwest-middleware`.
//!
//! The example `trace-context-service` implements the trace-context test harness contract:
//! `cargo run -p contextflow-http --example trace-context-service -- --port 8080`; the
//! example `grpc` runs a tonic server and client through the layers.
//!
//! A gRPC call (`POST /{service}/{method}` with a `content-type` of `application/grpc...`) gets
//! spans named `{service}/{method}` with `rpc.system` (`grpc`), `rpc.service` and `rpc.method`
//! (the RPC conventions before their v1.38 renames, which `rpc.grpc.status_code` below also
//! follows). The path comes from the peer: only one made of protobuf identifiers, at most 256
//! bytes, names a span; any other is named by its HTTP method. A server span of a method the
//! service does not have (answered `UNIMPLEMENTED`, as tonic answers an unknown path) is
//! renamed `grpc` when it ends, so that calls to made-up paths do not each make a span name;
//! its `rpc.service` and `rpc.method` keep what the caller sent. A call refused before the
//! service's router (an authentication layer inside this one answering `UNAUTHENTICATED`),
//! or cut short, keeps the name the caller's path gave it, and samplers see that name at the
//! span's start.
//!
//! gRPC answers a failed call with HTTP 200 and a `grpc-status`; the spans record it as
//! `rpc.grpc.status_code` and fail as the RPC conventions say (a server span for `UNKNOWN`,
//! `DEADLINE_EXCEEDED`, `UNIMPLEMENTED`, `INTERNAL`, `UNAVAILABLE`, `DATA_LOSS`; a client span
//! for any code but `OK`). The server span reads it from the response's headers or its
//! trailers; a client span, which ends with the response's head, only from the headers (a
//! trailers-only answer: how a call that fails before its first message is answered).
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

pub mod client;
mod headers;
#[cfg(feature = "reqwest")]
mod reqwest;
pub mod server;
mod spans;

#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub use crate::reqwest::InjectContextMiddleware;
pub use crate::{
    client::{ClientFuture, InjectContext, InjectContextLayer},
    headers::{
        extract_headers, inject_headers, HeaderExtractor, HeaderInjector, BAGGAGE_HEADER,
        TRACEPARENT, TRACESTATE, X_REQUEST_ID,
    },
    server::{ContextBody, PropagateContext, PropagateContextLayer, ResponseFuture},
};
pub use contextflow_otel::{
    current_request_id, current_span_id, current_trace_id, RequestId, REQUEST_ID,
};
