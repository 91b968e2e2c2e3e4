//! The request context: what every layer of the service reads without receiving it as a
//! parameter.
//!
//! Three [`AsyncLocal`]s, bound at the edge of each request:
//!
//! - [`REQUEST_ID`] and [`TRACE`] by the HTTP context middleware (from the `x-request-id` and
//!   `traceparent` headers when they are well formed, fresh ones otherwise);
//! - [`TENANT`] by the authentication middleware only, after it checked the bearer token.
//!   Nothing read from a request (a header, the body) ever sets the tenant directly.
//!
//! All three are inherited by tasks spawned with [`contextflow::spawn`], so the confirmation
//! job logs under the request that started it. The database transaction is *not* here: it is
//! bound by `contextflow_sqlx::TxPool`, never inherited.

use std::fmt;

use contextflow::AsyncLocal;

/// The id of the current request, echoed in the `x-request-id` response header and in every
/// log line.
pub static REQUEST_ID: AsyncLocal<RequestId> = AsyncLocal::named("order_service.request_id");
/// The W3C trace context of the current request.
pub static TRACE: AsyncLocal<TraceContext> = AsyncLocal::named("order_service.trace");
/// The authenticated tenant of the current request.
pub static TENANT: AsyncLocal<TenantId> = AsyncLocal::named("order_service.tenant");

/// The longest request id accepted from a client.
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// A request id: 1 to 64 characters of `[A-Za-z0-9._:-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(String);

/// A tenant id, as found in the token table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TenantId(String);

/// A W3C trace context: the trace id shared by every hop and this hop's span id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    sampled: bool,
}

// ===== impl RequestId =====

impl RequestId {
    /// Validates an id received from a client; `None` when it is empty, too long or holds a
    /// character outside `[A-Za-z0-9._:-]` (it is then replaced by a fresh one, never logged raw).
    pub fn parse(raw: &str) -> Option<RequestId> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_REQUEST_ID_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        ok.then(|| RequestId(raw.to_string()))
    }

    /// A fresh random id.
    pub fn generate() -> RequestId {
        RequestId(uuid::Uuid::new_v4().to_string())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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

// ===== impl TraceContext =====

impl TraceContext {
    /// A new trace (no valid `traceparent` came in): fresh trace and span ids, sampled.
    pub fn new_root() -> TraceContext {
        TraceContext {
            trace_id: uuid::Uuid::new_v4().as_u128(),
            span_id: random_span_id(),
            sampled: true,
        }
    }

    /// Parses a `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`); `None` when malformed,
    /// including the all-zero ids the specification forbids.
    pub fn parse_traceparent(raw: &str) -> Option<TraceContext> {
        let mut parts = raw.trim().split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            (s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                .then_some(())
        };
        hex(version, 2)?;
        hex(trace, 32)?;
        hex(parent, 16)?;
        hex(flags, 2)?;
        // Version ff is invalid; version 00 has exactly four fields.
        if version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(parent, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(TraceContext {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The context of a new hop (a server receiving this one, or an outgoing call): same
    /// trace, fresh span id.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: random_span_id(),
            ..*self
        }
    }

    /// The trace id as 32 lower-case hex digits.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// This hop's span id as 16 lower-case hex digits.
    pub fn span_id(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// The `traceparent` header value that names this hop as the parent.
    pub fn to_traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

fn random_span_id() -> u64 {
    // The low half of a v4 uuid: random bits, never all zero in practice; guard anyway.
    (uuid::Uuid::new_v4().as_u128() as u64).max(1)
}

/// The current request id, if any.
pub fn request_id() -> Option<RequestId> {
    REQUEST_ID.get()
}

/// The current tenant, if the request was authenticated.
pub fn tenant() -> Option<TenantId> {
    TENANT.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip_and_rejects() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse_traceparent(tp).unwrap();
        assert_eq!(ctx.to_traceparent(), tp);
        assert_eq!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for (bad, reason) in [
            ("", "empty"),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "zero trace",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "zero span",
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "upper case",
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version ff",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                "extra field",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
                "short trace",
            ),
        ] {
            assert_eq!(TraceContext::parse_traceparent(bad), None, "{reason}");
        }
    }

    #[test]
    fn request_id_validation() {
        assert!(RequestId::parse("demo-1.a_b:c").is_some());
        assert!(RequestId::parse("").is_none());
        assert!(RequestId::parse("has space").is_none());
        assert!(RequestId::parse("line\nbreak").is_none());
        assert!(RequestId::parse(&"x".repeat(65)).is_none());
    }
}
