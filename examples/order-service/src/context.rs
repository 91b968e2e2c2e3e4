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
//! All three are inherited by tasks spawned with [`contextflow::spawn`], so work a request
//! starts logs under it. The confirmation is not such a task: the outbox worker delivers it
//! later, in a context rebuilt from the outbox row. The database transaction is *not* here:
//! it is bound by `contextflow_sqlx::TxPool`, never inherited.

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

/// The `traceparent` that continues the current trace, as the propagator writes it: what an
/// outbox row or a pending order stores so later work joins the request's trace.
pub fn traceparent() -> Option<String> {
    let mut carrier = std::collections::HashMap::new();
    contextflow_otel::inject(&mut carrier);
    carrier.remove("traceparent")
}

/// The context stored with an order or an outbox row, rebuilt: its request id and trace, read
/// with the same validation as incoming headers (a malformed value is replaced, never
/// trusted). The tenant is not in it: the caller binds the row's own tenant.
pub fn stored_context(
    request_id: Option<&str>,
    traceparent: Option<&str>,
) -> opentelemetry::Context {
    let mut pairs = Vec::new();
    if let Some(id) = request_id {
        pairs.push(("x-request-id", id));
    }
    if let Some(tp) = traceparent {
        pairs.push(("traceparent", tp));
    }
    contextflow_otel::extract(&contextflow_otel::carrier::Pairs::new(pairs))
}
