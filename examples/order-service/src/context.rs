//! The request context: what every layer of the service reads without receiving it as a
//! parameter.
//!
//! - The request id and the W3C trace context are `contextflow-http`'s
//!   [`REQUEST_ID`] and [`TRACE_CONTEXT`], bound by its `PropagateContextLayer` from the
//!   `x-request-id` and `traceparent` headers when they are well formed, fresh otherwise.
//! - [`TENANT`] is this application's own, bound by the authentication middleware only, after
//!   it checked the bearer token. Nothing read from a request (a header, the body, baggage)
//!   ever sets it directly.
//!
//! All three are inherited by tasks spawned with [`contextflow::spawn`], so the confirmation
//! job logs under the request that started it. The database transaction is *not* here: it is
//! bound by `contextflow_sqlx::TxPool`, never inherited.

use std::{fmt, future::Future};

use contextflow::AsyncLocal;
pub use contextflow_http::{RequestId, TraceContext, TraceId, REQUEST_ID, TRACE_CONTEXT};

/// The authenticated tenant of the current request.
pub static TENANT: AsyncLocal<TenantId> = AsyncLocal::named("order_service.tenant");

/// The current trace id, as a log field.
///
/// A copy of [`TRACE_CONTEXT`]'s trace id, bound by [`with_trace_id`]: `contextflow-tracing`
/// prints variables whose value is `Display`, and `contextflow_http::TraceContext` is not.
pub static TRACE_ID: AsyncLocal<TraceId> = AsyncLocal::named("order_service.trace_id");

/// A tenant id, as found in the token table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TenantId(String);

// ===== impl TenantId =====

impl TenantId {
    /// Wraps a tenant name from the (trusted) token table or configuration.
    pub fn new(name: impl Into<String>) -> TenantId {
        TenantId(name.into())
    }

    /// The tenant as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The current request id, if any.
pub fn request_id() -> Option<RequestId> {
    contextflow_http::current_request_id()
}

/// The current trace id as 32 hex digits, if any.
pub fn trace_id() -> Option<String> {
    contextflow_http::current_trace_id().map(|id| id.to_string())
}

/// Runs `fut` with [`TRACE_ID`] bound to the trace id of the current [`TRACE_CONTEXT`] (read
/// when first polled, so call it inside the scope that binds the trace context).
pub async fn with_trace_id<F: Future>(fut: F) -> F::Output {
    match contextflow_http::current_trace_id() {
        Some(id) => TRACE_ID.scope(id, fut).await,
        None => fut.await,
    }
}

/// The current tenant, if the request was authenticated.
pub fn tenant() -> Option<TenantId> {
    TENANT.get()
}
