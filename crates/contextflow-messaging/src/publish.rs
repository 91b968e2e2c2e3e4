//! The publish side: the current context into an outgoing message's metadata.
//!
//! [`Publisher::inject`] writes what the configured propagators write (the current span as
//! the message's creation context, `tracestate`, baggage) plus the request id; nothing else of
//! the frame travels (never the tenant, the user or a transaction). The current span is the
//! creation context: start a producer span around the publish when you want one of its own.
//!
//! ```
//! use std::collections::HashMap;
//! use contextflow_messaging::Publisher;
//! use contextflow_otel::{carrier::InjectFn, RequestId, REQUEST_ID};
//!
//! let publisher = Publisher::new();
//! let mut headers = HashMap::new();
//! REQUEST_ID.sync_scope("order-17".parse::<RequestId>()?, || {
//!     publisher.inject(&mut InjectFn(|k: &str, v: String| {
//!         headers.insert(k.to_owned(), v);
//!     }))
//! });
//! assert_eq!(headers["x-request-id"], "order-17");
//! # Ok::<(), contextflow_otel::InvalidRequestId>(())
//! ```

use contextflow_otel::Propagation;
use opentelemetry::propagation::{Injector, TextMapPropagator};

/// Writes the current context into outgoing metadata; cheap to clone.
///
/// ```
/// let publisher = contextflow_messaging::Publisher::new();
/// assert!(publisher.fields().iter().any(|f| f == "x-request-id"));
/// ```
#[derive(Clone, Debug, Default)]
pub struct Publisher {
    propagation: Propagation,
}

impl Publisher {
    /// A publisher with OpenTelemetry's global propagator plus the request id.
    ///
    /// ```
    /// let publisher = contextflow_messaging::Publisher::new();
    /// # drop(publisher);
    /// ```
    pub fn new() -> Self {
        Publisher {
            propagation: Propagation::global(),
        }
    }

    /// Injects with `propagator` (plus the request id) instead of the global propagator.
    ///
    /// ```
    /// let publisher = contextflow_messaging::Publisher::new()
    ///     .with_propagator(contextflow_otel::TraceContextPropagator::new());
    /// assert_eq!(publisher.fields(), ["traceparent", "tracestate", "x-request-id"]);
    /// ```
    pub fn with_propagator<P>(mut self, propagator: P) -> Self
    where
        P: TextMapPropagator + Send + Sync + 'static,
    {
        self.propagation = Propagation::with_propagator(propagator);
        self
    }

    /// Writes the current context (see `contextflow_otel::current_context`) and request id
    /// into `injector`.
    ///
    /// ```
    /// use contextflow_otel::carrier::InjectFn;
    /// let mut written = Vec::new();
    /// contextflow_messaging::Publisher::new().inject(&mut InjectFn(|k: &str, v: String| written.push((k.to_owned(), v))));
    /// assert!(written.is_empty(), "nothing to write outside any request");
    /// ```
    pub fn inject(&self, injector: &mut dyn Injector) {
        self.propagation
            .inject(&contextflow_otel::current_context(), injector)
    }

    /// The metadata keys this publisher may write (lower case).
    ///
    /// ```
    /// let fields = contextflow_messaging::Publisher::new().fields();
    /// assert!(fields.iter().any(|f| f == "traceparent"));
    /// ```
    pub fn fields(&self) -> Vec<String> {
        self.propagation.fields()
    }

    /// The metadata keys a republished message loses before this publisher writes its own:
    /// [`fields`](Self::fields) and always the default ones (`traceparent`, `tracestate`,
    /// `baggage`, `x-request-id`), so that a publisher with a narrower propagator does not
    /// pass on the first send's baggage or trace as if it were the current context's.
    pub(crate) fn replaced_fields(&self) -> Vec<String> {
        let mut fields = self.fields();
        for field in ["traceparent", "tracestate", "baggage", "x-request-id"] {
            if !fields.iter().any(|f| f.eq_ignore_ascii_case(field)) {
                fields.push(field.to_owned());
            }
        }
        fields
    }
}
