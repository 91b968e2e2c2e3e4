//! Carrying tracing's current span across contextflow spawns.

use contextflow::carry::{self, Carrier};
use tracing::Span;

/// A [`Carrier`] for tracing's current span: `contextflow::spawn`, `spawn_blocking`,
/// `contextflow::thread::spawn` and `in_current_context` capture [`Span::current`] and enter it
/// around every poll of the child (as `.in_current_span()` would), so the child's events and
/// spans sit inside the parent's span.
///
/// As with `.in_current_span()`, a child holds a handle to the span, so a span stays open
/// (and, with `tracing-opentelemetry`, is exported later) until the last child that carries it
/// ends. Start work that outlives the request with `contextflow::spawn_without_context`.
///
/// A snapshot that carries no span (one captured outside every span, an empty one) does not
/// hide the span current where it runs: tracing has no way to make "no span" current, so its
/// [`Carrier::enter_none`] is the default, and such a child, polled inside another span (a rayon
/// job a worker steals inside a span), sees that span.
///
/// Register it with [`carry_spans`]; [`ContextFields::text`](crate::ContextFields::text) and
/// [`ContextFields::json`](crate::ContextFields::json) do so too.
///
/// ```
/// use contextflow::carry::Carrier;
/// use contextflow_tracing::SpanCarrier;
///
/// // Outside any span there is nothing to carry.
/// assert!(SpanCarrier.capture().is_none());
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct SpanCarrier;

impl Carrier for SpanCarrier {
    type Value = Span;

    fn capture(&self) -> Option<Span> {
        let span = Span::current();
        // `Span::none()` (no subscriber, or no current span) is not worth storing.
        (!span.is_none()).then_some(span)
    }

    fn enter(&self, span: &Span, f: &mut dyn FnMut()) {
        span.in_scope(f)
    }
}

/// Registers [`SpanCarrier`] for the rest of the process; returns `false` if it already was.
/// Safe to call any number of times.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
/// contextflow_tracing::carry_spans();
///
/// let span = tracing::info_span!("request");
/// let child = span.in_scope(|| contextflow::spawn(async { tracing::Span::current().id() }));
/// assert_eq!(child.await.unwrap(), span.id());
/// # }
/// ```
pub fn carry_spans() -> bool {
    carry::register(SpanCarrier)
}
