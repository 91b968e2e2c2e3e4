//! Behaviour of contextflow-http through its public API.

mod baggage;
mod client;
mod props;
mod request_id;
mod server;
mod traceparent;
mod tracestate;
