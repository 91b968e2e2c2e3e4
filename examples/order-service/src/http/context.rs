//! The server side of context propagation: request id and W3C trace context in, context bound
//! for the whole request, request id echoed back.

use axum::{
    extract::Request,
    http::{HeaderMap, HeaderValue},
    middleware::Next,
    response::Response,
};
use tracing::{debug, info, Instrument as _};

use crate::context::{RequestId, TraceContext, REQUEST_ID, TRACE};

/// Middleware for the order service's own routes.
pub async fn propagate_orders_context(req: Request, next: Next) -> Response {
    propagate("orders", req, next).await
}

/// Middleware for the payment stub (another service in a real deployment).
pub async fn propagate_payment_context(req: Request, next: Next) -> Response {
    propagate("payment", req, next).await
}

async fn propagate(service: &'static str, req: Request, next: Next) -> Response {
    let request_id = extract_request_id(req.headers());
    let trace = extract_trace(req.headers());
    // The path is client input: bounded here, escaped by the log layer.
    let path: String = req.uri().path().chars().take(128).collect();
    let span = tracing::info_span!("http.request", service, method = %req.method(), path);
    let header = HeaderValue::from_str(request_id.as_str()).ok();
    let handle = async move {
        info!("request started");
        let mut response = next.run(req).await;
        info!(status = response.status().as_u16(), "request finished");
        if let Some(header) = header {
            response.headers_mut().insert("x-request-id", header);
        }
        response
    };
    REQUEST_ID
        .scope(request_id, TRACE.scope(trace, handle.instrument(span)))
        .await
}

fn extract_request_id(headers: &HeaderMap) -> RequestId {
    let Some(raw) = headers.get("x-request-id") else {
        return RequestId::generate();
    };
    match raw.to_str().ok().and_then(RequestId::parse) {
        Some(id) => id,
        None => {
            debug!("malformed x-request-id replaced by a fresh one");
            RequestId::generate()
        }
    }
}

fn extract_trace(headers: &HeaderMap) -> TraceContext {
    let Some(raw) = headers.get("traceparent") else {
        return TraceContext::new_root();
    };
    match raw.to_str().ok().and_then(TraceContext::parse_traceparent) {
        // This server is a new hop of the caller's trace.
        Some(parent) => parent.child(),
        None => {
            debug!("malformed traceparent: starting a new trace");
            TraceContext::new_root()
        }
    }
}
