//! The request span: `contextflow-http`'s `PropagateContextLayer` (outside this) has bound the
//! request id and the OpenTelemetry context (the trace id log field); this middleware opens the
//! `http.request` span every line of the request nests under, and logs its start and end.

use axum::{extract::Request, middleware::Next, response::Response};
use tracing::{debug, info, Instrument as _};

/// Middleware for the order service's own routes.
pub async fn orders_request_span(req: Request, next: Next) -> Response {
    request_span("orders", req, next).await
}

/// Middleware for the payment stub (another service in a real deployment).
pub async fn payment_request_span(req: Request, next: Next) -> Response {
    request_span("payment", req, next).await
}

async fn request_span(service: &'static str, req: Request, next: Next) -> Response {
    // The path is client input: bounded here, escaped by the log layer.
    let path: String = req.uri().path().chars().take(128).collect();
    let span = tracing::info_span!("http.request", service, method = %req.method(), path);
    let handle = async move {
        debug!("request started");
        let response = next.run(req).await;
        info!(status = response.status().as_u16(), "request finished");
        response
    };
    handle.instrument(span).await
}
