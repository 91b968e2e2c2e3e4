//! The order controllers.

use axum::{
    extract::{rejection::PathRejection, Path, State},
    http::StatusCode,
    Json,
};
use tracing::{info, Instrument as _};

use super::{ApiError, AppJson, AppState};
use crate::{db::Order, service::NewOrder};

/// `POST /orders`: places an order in one transaction, then sends its confirmation in the
/// background.
///
/// # Errors
/// `400`/`415`/`422` for a malformed body or order, `409` for insufficient stock, `402` when
/// the payment is declined, `5xx` when a dependency fails. Nothing is written on error.
pub async fn create_order(
    State(app): State<AppState>,
    AppJson(order): AppJson<NewOrder>,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    let span =
        tracing::info_span!("controller", handler = "create_order", reference = %order.reference);
    async move {
        info!(lines = order.items.len(), "order received");
        let placed = app
            .db
            .transaction(|| app.service.place_order(&order))
            .await?;
        app.jobs.send_confirmation(placed.id, &placed.reference);
        info!(order_id = placed.id, "order accepted");
        Ok((StatusCode::CREATED, Json(placed)))
    }
    .instrument(span)
    .await
}

/// `GET /orders/{id}`: one of the caller's tenant's orders.
///
/// # Errors
/// `400` for a non-numeric id, `404` when the tenant has no such order (also when another
/// tenant does).
pub async fn get_order(
    State(app): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<Order>, ApiError> {
    let Path(id) =
        id.map_err(|rejection| ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text()))?;
    let span = tracing::info_span!("controller", handler = "get_order", order_id = id);
    async move {
        match app.service.order(id).await? {
            Some(order) => Ok(Json(order)),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no order {id}"),
            )),
        }
    }
    .instrument(span)
    .await
}

/// Any other route.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

/// A known route with another method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}
