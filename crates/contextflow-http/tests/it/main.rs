//! Behaviour of contextflow-http through its public API.

mod baggage;
mod client;
#[cfg(feature = "reqwest")]
mod e2e;
mod logging;
mod props;
mod request_id;
mod server;
mod traceparent;
mod tracestate;
#[cfg(feature = "reqwest")]
mod validation_service;
