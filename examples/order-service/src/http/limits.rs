//! Per-request limits, inside the request span so each refusal is logged with the request's
//! context: more than [`Limits::max_headers`] header fields besides `x-request-id` (`431`), a request not answered
//! within [`Limits::request_timeout`] (`503`), and the body deadline the JSON extractor
//! enforces ([`Limits::body_timeout`], `408`). The body size limit is axum's
//! `DefaultBodyLimit`, whose refusal (`413`) the extractor turns into a JSON error too.

use std::time::Duration;

use axum::{
    extract::{Request, State},
    http::StatusCode,
    middleware::Next,
    response::{IntoResponse as _, Response},
};

use super::{server::Limits, ApiError};

/// The time left to receive the body, put in the request's extensions for [`super::AppJson`].
#[derive(Clone, Copy, Debug)]
pub struct BodyTimeout(pub Duration);

/// Enforces `limits` on one request.
pub async fn enforce(State(limits): State<Limits>, mut req: Request, next: Next) -> Response {
    // `x-request-id` is not counted: the context layer outside has rewritten it (added one
    // when the client sent none, folded repeats into one), so its count here says nothing
    // of what the client sent. The limit is on the other fields.
    let ids = req.headers().get_all("x-request-id").iter().count();
    let headers = req.headers().len() - ids;
    if headers > limits.max_headers {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "{headers} header fields; at most {} accepted",
                limits.max_headers
            ),
        )
        .into_response();
    }
    req.extensions_mut()
        .insert(BodyTimeout(limits.body_timeout));
    let writes = req.method() == axum::http::Method::POST;
    match tokio::time::timeout(limits.request_timeout, next.run(req)).await {
        Ok(response) => response,
        // The outcome is unknown to the client: an order recorded before the deadline is
        // still charged and decided (`OrderService::place_order`), so the message says how to
        // learn it instead of implying that nothing happened.
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            if writes {
                format!(
                    "request not completed within {} ms; its outcome is unknown: an order it \
                     recorded is still decided, and a retry with the same reference returns it",
                    limits.request_timeout.as_millis()
                )
            } else {
                format!(
                    "request not completed within {} ms",
                    limits.request_timeout.as_millis()
                )
            },
        )
        .into_response(),
    }
}
