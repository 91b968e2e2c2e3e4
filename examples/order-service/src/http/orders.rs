//! The order controllers.

use axum::{
    extract::{rejection::PathRejection, Path, State},
    http::StatusCode,
    Json,
};
use tracing::{debug, Instrument as _};

use super::{ApiError, AppJson, AppState};
use crate::{
    db::Order,
    service::{NewOrder, Placed},
};

/// `POST /orders`: places an order (reserve, charge, decide: see [`crate::service`]).
///
/// `201 Created` with the new order, paid; `200 OK` with the first order when the tenant used
/// this reference before (a retry), as it stands (`pending`, `paid` or `cancelled`).
///
/// # Errors
/// `400`/`415`/`422` for a malformed body or order, `409` for insufficient stock, `402` when
/// the payment is declined (the order is cancelled), `503` when the provider cannot be reached
/// (the order stays pending and is decided later), `5xx` when a dependency fails.
pub async fn create_order(
    State(app): State<AppState>,
    AppJson(order): AppJson<NewOrder>,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    let span =
        tracing::info_span!("controller", handler = "create_order", reference = %order.reference);
    async move {
        debug!(lines = order.items.len(), "order received");
        match app.service.place_order(&order).await? {
            Placed::Created(placed) => {
                // "order placed" (INFO, the service's) already says it.
                debug!(order_id = placed.id, "order accepted");
                Ok((StatusCode::CREATED, Json(placed)))
            }
            Placed::Existing(existing) => Ok((StatusCode::OK, Json(existing))),
        }
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
