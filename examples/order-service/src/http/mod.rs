//! The HTTP edge: routes, the context and authentication middleware, the controllers and the
//! JSON error type.
//!
//! Middleware order, outermost first: `contextflow_http::PropagateContextLayer` binds the
//! request id and trace context (valid incoming headers, fresh values otherwise) and echoes the
//! request id; [`orders_request_span`] opens the `http.request` span; [`limits::enforce`]
//! bounds the header count and the request's time; [`auth::authenticate`] checks the bearer
//! token and binds the tenant; then the controller. Every error, 404 and 405 included, is a
//! JSON [`ApiError`]. The connections themselves are served by [`server`].

pub mod auth;
mod context;
mod error;
pub mod limits;
pub mod orders;
pub mod server;

use axum::{
    extract::DefaultBodyLimit,
    routing::{get, post},
    Router,
};

pub use self::{
    auth::TokenTable,
    context::{orders_request_span, payment_request_span},
    error::{ApiError, AppJson},
    server::Limits,
};
use crate::{db::Db, outbox::OutboxSignal, queue::Queue, service::OrderService};

/// What the controllers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The database (for the transaction).
    pub db: Db,
    /// The business rules.
    pub service: OrderService,
    /// Wakes the outbox worker; tells when the outbox is delivered.
    pub outbox: OutboxSignal,
    /// The message queue the outbox publishes to.
    pub queue: Queue,
}

/// The service's routes: `POST /orders`, `GET /orders/{id}`, both authenticated.
pub fn router(state: AppState, tokens: TokenTable, limits: Limits) -> Router {
    Router::new()
        .route("/orders", post(orders::create_order))
        .route("/orders/{id}", get(orders::get_order))
        .route_layer(axum::middleware::from_fn_with_state(
            tokens,
            auth::authenticate,
        ))
        .fallback(orders::not_found)
        .method_not_allowed_fallback(orders::method_not_allowed)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            limits,
            limits::enforce,
        ))
        .layer(axum::middleware::from_fn(orders_request_span))
        .layer(contextflow_http::PropagateContextLayer::new())
        .with_state(state)
}
