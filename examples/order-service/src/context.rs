//! The request context: what every layer of the service reads without receiving it as a
//! parameter.
//!
//! - The request id and the W3C trace context are `contextflow-http`'s
//!   [`REQUEST_ID`] and [`TRACE_CONTEXT`], bound by its `PropagateContextLayer` from the
//!   `x-request-id` and `traceparent` headers when they are well formed, fresh otherwise.
//! - [`OTEL_CONTEXT`] is `contextflow-otel`'s: the same trace as an OpenTelemetry context,
//!   bound by [`with_otel_context`]; it displays as the trace id, the `trace_id` log field.
//! - [`TENANT`] is this application's own, bound by the authentication middleware only, after
//!   it checked the bearer token. Nothing read from a request (a header, the body, baggage)
//!   ever sets it directly.
//!
//! All three are inherited by tasks spawned with [`contextflow::spawn`], so the confirmation
//! job logs under the request that started it. The database transaction is *not* here: it is
//! bound by `contextflow_sqlx::TxPool`, never inherited.

use std::{fmt, future::Future};

use contextflow::AsyncLocal;
pub use contextflow_http::{RequestId, TraceContext, REQUEST_ID, TRACE_CONTEXT};
pub use contextflow_otel::OTEL_CONTEXT;
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

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

/// The current trace id as 32 hex digits, if any (from the W3C trace context).
pub fn trace_id() -> Option<String> {
    contextflow_http::current_trace_id().map(|id| id.to_string())
}

/// Runs `fut` in the OpenTelemetry context of the current request: the [`TRACE_CONTEXT`] that
/// `contextflow-http` extracted becomes the remote parent (`contextflow_otel::in_remote_context`),
/// so [`OTEL_CONTEXT`] (the `trace_id` log field) is set and any OpenTelemetry span started
/// inside joins the request's trace. Reads the trace context when first polled, so call it
/// inside the scope that binds it.
pub async fn with_otel_context<F: Future>(fut: F) -> F::Output {
    match TRACE_CONTEXT.get() {
        Some(trace) => {
            let parent = SpanContext::new(
                TraceId::from_bytes(trace.trace_id().to_bytes()),
                SpanId::from_bytes(trace.span_id().to_bytes()),
                TraceFlags::new(trace.flags().bits()),
                true,
                TraceState::default(),
            );
            contextflow_otel::in_remote_context(parent, fut).await
        }
        None => fut.await,
    }
}

/// The current tenant, if the request was authenticated.
pub fn tenant() -> Option<TenantId> {
    TENANT.get()
}
