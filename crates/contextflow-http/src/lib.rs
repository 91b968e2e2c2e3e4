//! W3C Trace Context, W3C Baggage and request ids for [`contextflow`], with tower middleware
//! for servers and clients.
//!
//! Inside a process, `contextflow` carries request context through `.await`, spawned tasks and
//! threads by itself. Across a process boundary only what a propagator writes travels: this
//! crate reads and writes the three things that do, as HTTP headers.
//!
//! - **Server**: [`PropagateContextLayer`] reads `traceparent`, `tracestate`, `baggage` and
//!   `x-request-id` from each request, makes this service's span id, and runs the handler, the
//!   response body and their destructors with [`TRACE_CONTEXT`], [`REQUEST_ID`] and
//!   [`BAGGAGE`] set. It echoes the request id on the response.
//! - **Client**: [`InjectContextLayer`] (any tower HTTP client) and `InjectContextMiddleware`
//!   (`reqwest-middleware`, feature `reqwest`) write the current context into outgoing
//!   requests: the same trace id, a new span id per request.
//! - **Anywhere**: [`current_trace_id`], [`current_request_id`], [`current_baggage_value`]...
//!   read the context from any code that runs for the request, including tasks started with
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
//!     let trace_id = contextflow_http::current_trace_id().unwrap();
//!     format!("request {request_id} in trace {trace_id}")
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> std::io::Result<()> {
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
//! For other transports (message metadata, a child process's environment), use
//! [`IncomingContext::from_headers`] and [`inject_headers`] with an [`http::HeaderMap`].
//!
//! # Headers and limits
//!
//! | header | read as | written as | bounds |
//! |---|---|---|---|
//! | `traceparent` | [`TraceParent`]: version `00` exactly, future versions leniently; lower-case hex; no all-zero id; one header only | version `00`, this trace id, a new span id per outgoing request, *sampled* and *random* flags | 55 characters |
//! | `tracestate` | [`TraceState`]: dropped whole when malformed, with a repeated key, with more than 32 members, or when `traceparent` is invalid | as received, in order | 32 members, 512 characters (members over 128 characters dropped first, then from the end) |
//! | `baggage` | [`Baggage`]: percent-decoded values, properties kept, malformed members dropped | percent-encoded | 180 members, 8,192 bytes |
//! | `x-request-id` | [`RequestId`]: 1 to 128 bytes of visible ASCII, else a new UUID v4 | echoed on the response (unless the handler set one) and forwarded | 128 bytes |
//!
//! # Security
//!
//! Headers come from the client and are untrusted. Every value is validated and bounded
//! before it enters the context; a malformed one is dropped with a `debug` log and a fresh one
//! made. Parsing never panics (property-tested on arbitrary bytes). Log lines never show a
//! raw value: it is ASCII-escaped and cut to 64 bytes, and errors name the rule that failed,
//! not the value. This crate never sets a tenant or a user, and baggage must not be used for
//! either: they come from authenticated code only.
//!
//! # Features
//!
//! - `reqwest` (off by default): `InjectContextMiddleware` for `reqwest-middleware`.
//!
//! The example `trace-context-service` implements the trace-context test harness contract:
//! `cargo run -p contextflow-http --example trace-context-service -- --port 8080`.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

pub mod baggage;
pub mod client;
mod context;
mod rand;
pub mod request_id;
#[cfg(feature = "reqwest")]
mod reqwest;
pub mod server;
pub mod trace_context;
pub mod trace_state;

#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub use crate::reqwest::InjectContextMiddleware;
pub use crate::{
    baggage::{Baggage, BaggageMember, InvalidBaggage, BAGGAGE_HEADER},
    client::{InjectContext, InjectContextLayer},
    context::{
        current_baggage_value, current_request_id, current_span_id, current_trace_id,
        current_traceparent, inject_headers, IncomingContext, BAGGAGE, REQUEST_ID, TRACE_CONTEXT,
    },
    request_id::{InvalidRequestId, RequestId, X_REQUEST_ID},
    server::{ContextBody, PropagateContext, PropagateContextLayer, ResponseFuture},
    trace_context::{
        InvalidTraceParent, SpanId, TraceContext, TraceFlags, TraceId, TraceParent, TRACEPARENT,
    },
    trace_state::{InvalidTraceState, TraceState, TRACESTATE},
};
