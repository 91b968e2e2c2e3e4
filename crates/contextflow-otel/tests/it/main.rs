//! Behaviour of contextflow-otel through its public API: the codecs, the propagators and the
//! carriers.

mod baggage;
mod layering;
mod propagators;
mod props;
mod request_id;
mod traceparent;
mod tracestate;
