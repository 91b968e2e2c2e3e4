//! The request context: what every layer of the service reads without receiving it as a
//! parameter.
//!
//! - The request id is `contextflow-otel`'s [`REQUEST_ID`], bound by `contextflow-http`'s
//!   `PropagateContextLayer` from the `x-request-id` header when it is well formed, fresh
//!   otherwise.
//! - [`OTEL_CONTEXT`] is `contextflow-otel`'s: the request's OpenTelemetry context (the trace
//!   the `traceparent` header continues), bound by the same layer; it displays as the trace
//!   id, the `trace_id` log field.
//! - [`TENANT`] is this application's own, bound by the authentication middleware only, after
//!   it checked the bearer token. Nothing read from a request (a header, the body, baggage)
//!   ever sets it directly.
//!
//! All three are inherited by tasks spawned with [`contextflow::spawn`], so the confirmation
//! job logs under the request that started it. The database transaction is *not* here: it is
//! bound by `contextflow_sqlx::TxPool`, never inherited.

use std::fmt;

use contextflow::AsyncLocal;
pub use contextflow_http::{RequestId, REQUEST_ID};
pub use contextflow_otel::OTEL_CONTEXT;

/// The authenticated tenant of the current request.
pub static TENANT: AsyncLocal<TenantId> = AsyncLocal::named("order_service.tenant");

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

/// The current trace id as 32 hex digits, if any (OpenTelemetry's current trace).
pub fn trace_id() -> Option<String> {
    contextflow_http::current_trace_id().map(|id| id.to_string())
}

/// The current tenant, if the request was authenticated.
pub fn tenant() -> Option<TenantId> {
    TENANT.get()
}
