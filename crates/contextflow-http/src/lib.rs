//! GUIDE_PLACEHOLDER
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod baggage;
mod client;
mod context;
mod rand;
mod request_id;
#[cfg(feature = "reqwest")]
mod reqwest;
mod server;
mod trace_context;
mod trace_state;

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
