//! JSON errors: `{"error": "...", "request_id": "..."}` with a 4xx or 5xx status.

use axum::{
    extract::{FromRequest, Request},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{error, warn};

use super::limits::BodyTimeout;
use crate::{context, payment::PaymentError, service::ServiceError};

/// An error answer: a status and a message safe to show the client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

/// A JSON body extractor whose rejections are [`ApiError`]s (axum's own are plain text).
#[derive(Debug)]
pub struct AppJson<T>(pub T);

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// `401 Unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, message)
    }

    /// Its status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message the client gets.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            error!(status = self.status.as_u16(), error = %self.message, "request failed");
        } else {
            warn!(status = self.status.as_u16(), error = %self.message, "request rejected");
        }
        let request_id = context::request_id().map(|id| id.as_str().to_owned());
        let body = json!({ "error": self.message, "request_id": request_id });
        (self.status, Json(body)).into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(err: ServiceError) -> Self {
        let status = match &err {
            ServiceError::Invalid(_)
            | ServiceError::UnknownProduct(_)
            | ServiceError::ReferenceReused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ServiceError::InsufficientStock { .. } | ServiceError::CancelledAfterCharge { .. } => {
                StatusCode::CONFLICT
            }
            ServiceError::Payment(PaymentError::Declined) => StatusCode::PAYMENT_REQUIRED,
            ServiceError::Payment(PaymentError::Unavailable(_) | PaymentError::Refused(_)) => {
                StatusCode::BAD_GATEWAY
            }
            ServiceError::PaymentPending { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ServiceError::Repo(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = if status.is_server_error()
            && !matches!(
                err,
                ServiceError::Payment(_) | ServiceError::PaymentPending { .. }
            ) {
            // Database details stay in the log.
            error!(error = %err, "internal error");
            "internal error".to_string()
        } else {
            err.to_string()
        };
        ApiError::new(status, message)
    }
}

impl<S, T> FromRequest<S> for AppJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let deadline = req
            .extensions()
            .get::<BodyTimeout>()
            .map_or(Duration::MAX, |t| t.0);
        match tokio::time::timeout(deadline, Json::<T>::from_request(req, state)).await {
            Ok(Ok(Json(value))) => Ok(AppJson(value)),
            Ok(Err(rejection)) => Err(ApiError::new(rejection.status(), rejection.body_text())),
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {} ms",
                    deadline.as_millis()
                ),
            )),
        }
    }
}
