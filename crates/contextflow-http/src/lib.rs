//! GUIDE_PLACEHOLDER
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod baggage;
mod context;
mod rand;
mod request_id;
mod trace_context;
mod trace_state;

pub use crate::{
    baggage::{Baggage, BaggageMember, InvalidBaggage, BAGGAGE_HEADER},
    context::{
        current_baggage_value, current_request_id, current_span_id, current_trace_id,
        current_traceparent, inject_headers, IncomingContext, BAGGAGE, REQUEST_ID, TRACE_CONTEXT,
    },
    request_id::{InvalidRequestId, RequestId, X_REQUEST_ID},
    trace_context::{
        InvalidTraceParent, SpanId, TraceContext, TraceFlags, TraceId, TraceParent, TRACEPARENT,
    },
    trace_state::{InvalidTraceState, TraceState, TRACESTATE},
};
