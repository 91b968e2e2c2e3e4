//! Which tracer consumer spans are started with (the global provider's by default), and the
//! OpenTelemetry messaging attributes they carry.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use opentelemetry::{
    global::BoxedTracer,
    trace::{Link, Span as _, SpanContext, SpanId, SpanKind, TraceContextExt as _, TraceFlags},
    trace::{TraceId, TraceState, Tracer as _},
    Context, KeyValue,
};

/// The instrumentation scope of the spans this crate starts.
pub(crate) const SCOPE: &str = "contextflow-messaging";

#[derive(Clone)]
pub(crate) enum Spans {
    /// The global provider's tracer, looked up on first use and kept once it is a real one.
    Global(Arc<GlobalTracer>),
    Tracer(Arc<BoxedTracer>),
    Off,
}

/// What a consumer span describes.
#[derive(Default)]
pub(crate) struct SpanInfo<'a> {
    pub(crate) system: Option<&'static str>,
    /// `messaging.destination.name` (for RabbitMQ, the exchange: empty for the default one).
    pub(crate) destination: Option<&'a str>,
    /// `messaging.destination.subscription.name`: what the consumer reads from, where that is
    /// not the destination (a RabbitMQ queue).
    pub(crate) subscription: Option<&'a str>,
    /// The system's own attributes of this message (a RabbitMQ routing key, delivery tag).
    pub(crate) extra: Vec<KeyValue>,
}

/// The global provider's tracer for one consumer or scheduler. While the global provider is
/// the no-op one (an application that installs its SDK after starting its consumers, or
/// never), it is asked again at most once per [`GlobalTracer::PROBE_EVERY`]: a consumer made
/// before the SDK was installed still gets spans once it is, and one without any SDK pays one
/// clock read per message. A real tracer, once found, is kept: a provider installed later in
/// its place (or shut down) is not seen by this consumer, as with any tracer taken from it.
pub(crate) struct GlobalTracer {
    tracer: OnceLock<BoxedTracer>,
    /// When the global provider may be asked next, in milliseconds since [`epoch`].
    next_probe_ms: AtomicU64,
    lookup: fn() -> BoxedTracer,
}

impl GlobalTracer {
    /// How long a no-op answer from the global provider is believed.
    pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(1);

    fn new(lookup: fn() -> BoxedTracer) -> Self {
        GlobalTracer {
            tracer: OnceLock::new(),
            next_probe_ms: AtomicU64::new(0),
            lookup,
        }
    }

    fn get(&self) -> Option<&BoxedTracer> {
        if let Some(tracer) = self.tracer.get() {
            return Some(tracer);
        }
        let now = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX);
        // Relaxed: a probe more or less when two threads race is harmless.
        if now < self.next_probe_ms.load(Ordering::Relaxed) {
            return None;
        }
        let every = u64::try_from(Self::PROBE_EVERY.as_millis()).unwrap_or(u64::MAX);
        self.next_probe_ms
            .store(now.saturating_add(every), Ordering::Relaxed);
        let tracer = (self.lookup)();
        if is_no_op(&tracer) {
            return None;
        }
        Some(self.tracer.get_or_init(|| tracer))
    }
}

/// The process-wide origin of [`GlobalTracer`]'s probe times.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn global_tracer() -> BoxedTracer {
    opentelemetry::global::tracer(SCOPE)
}

impl Spans {
    pub(crate) fn global() -> Self {
        Spans::Global(Arc::new(GlobalTracer::new(global_tracer)))
    }

    pub(crate) fn tracer<T>(tracer: T) -> Self
    where
        T: opentelemetry::trace::Tracer + Send + Sync + 'static,
        T::Span: Send + Sync + 'static,
    {
        Spans::Tracer(Arc::new(BoxedTracer::new(Box::new(tracer))))
    }

    fn get(&self) -> Option<&BoxedTracer> {
        match self {
            Spans::Global(global) => global.get(),
            Spans::Tracer(tracer) => Some(tracer),
            Spans::Off => None,
        }
    }

    /// Starts a `process` consumer span: a child of `parent` (one message) or, for a batch,
    /// a new root with a link to each message's creation context. Returns the context holding
    /// the span, or `None` when there is no tracer (or it is a no-op).
    pub(crate) fn start(
        &self,
        info: &SpanInfo<'_>,
        parent: &Context,
        links: Vec<SpanContext>,
        batch: Option<usize>,
    ) -> Option<Context> {
        let tracer = self.get()?;
        // The destination names the span; an empty one (RabbitMQ's default exchange) gives
        // way to the subscription (the queue), the low-cardinality name the consumer was made
        // with.
        let name = match info
            .destination
            .filter(|d| !d.is_empty())
            .or(info.subscription)
        {
            Some(destination) => format!("process {destination}"),
            None => "process".to_owned(),
        };
        let mut attrs = Vec::with_capacity(6 + info.extra.len());
        attrs.push(KeyValue::new("messaging.operation.type", "process"));
        attrs.push(KeyValue::new("messaging.operation.name", "process"));
        if let Some(system) = info.system {
            attrs.push(KeyValue::new("messaging.system", system));
        }
        if let Some(destination) = info.destination {
            attrs.push(KeyValue::new(
                "messaging.destination.name",
                destination.to_owned(),
            ));
        }
        if let Some(subscription) = info.subscription {
            attrs.push(KeyValue::new(
                "messaging.destination.subscription.name",
                subscription.to_owned(),
            ));
        }
        attrs.extend(info.extra.iter().cloned());
        if let Some(count) = batch {
            attrs.push(KeyValue::new(
                "messaging.batch.message_count",
                i64::try_from(count).unwrap_or(i64::MAX),
            ));
        }
        let builder = tracer
            .span_builder(name)
            .with_kind(SpanKind::Consumer)
            .with_attributes(attrs)
            .with_links(links.into_iter().map(Link::with_context).collect());
        let span = tracer.build_with_context(builder, parent);
        if !span.span_context().is_valid()
            || (!span.is_recording() && span.span_context() == parent.span().span_context())
        {
            // A no-op tracer passes the parent through: there is no span to own. An SDK that
            // returns an invalid span (its provider shut down while messages still drain)
            // would hide the producer's trace from the handler and its publishes.
            return None;
        }
        Some(parent.with_span(span))
    }

    /// Starts the root span `name` of a scheduled run (no parent, internal kind), with
    /// `attrs`. Returns the context holding it, or `None` when there is no tracer.
    #[cfg(feature = "cron")]
    pub(crate) fn start_root(&self, name: String, attrs: Vec<KeyValue>) -> Option<Context> {
        let tracer = self.get()?;
        let builder = tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_attributes(attrs);
        // An empty parent context: the run is the root of a trace of its own.
        let root = Context::new();
        let span = tracer.build_with_context(builder, &root);
        if !span.span_context().is_valid() {
            return None;
        }
        Some(root.with_span(span))
    }
}

/// Ends the span of `cx`, marking it failed with `error_type` when given.
pub(crate) fn end(cx: &Context, error_type: Option<&'static str>) {
    let span = cx.span();
    if let Some(error_type) = error_type {
        if span.is_recording() {
            span.set_attribute(KeyValue::new("error.type", error_type));
            span.set_status(opentelemetry::trace::Status::error(error_type));
        }
    }
    span.end();
}

fn is_no_op(tracer: &BoxedTracer) -> bool {
    let parent = SpanContext::new(
        TraceId::from(1u128),
        SpanId::from(1u64),
        TraceFlags::default(),
        true,
        TraceState::default(),
    );
    let cx = Context::new()
        .with_remote_span_context(parent.clone())
        .with_telemetry_suppressed();
    let probe = tracer.build_with_context(tracer.span_builder("probe"), &cx);
    !probe.is_recording() && *probe.span_context() == parent
}

impl fmt::Debug for Spans {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Spans::Global(_) => "Spans::Global",
            Spans::Tracer(_) => "Spans::Tracer",
            Spans::Off => "Spans::Off",
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use opentelemetry::trace::{noop::NoopTracer, TracerProvider as _};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};

    use super::*;

    /// Whether [`lookup`] finds an SDK, as `opentelemetry::global::tracer` would once the
    /// application has installed one (the global provider itself is left alone: other tests
    /// of this binary run meanwhile).
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    /// How many times [`lookup`] was called.
    static LOOKUPS: AtomicUsize = AtomicUsize::new(0);

    fn lookup() -> BoxedTracer {
        LOOKUPS.fetch_add(1, Ordering::SeqCst);
        if INSTALLED.load(Ordering::SeqCst) {
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(InMemorySpanExporter::default())
                .build();
            BoxedTracer::new(Box::new(provider.tracer("test")))
        } else {
            BoxedTracer::new(Box::new(NoopTracer::new()))
        }
    }

    /// A consumer whose first message came before the application installed its SDK starts
    /// spans once it is installed (it used to remember "no tracer" for good).
    #[test]
    fn an_sdk_installed_after_the_first_message_is_found() {
        let global = GlobalTracer::new(lookup);
        assert!(global.get().is_none());
        assert_eq!(LOOKUPS.load(Ordering::SeqCst), 1);
        // The no-op answer is believed for a while: the next probe is due `PROBE_EVERY` after
        // this one (no message here waits that long, which would be a timed test).
        let due = global.next_probe_ms.load(Ordering::Relaxed);
        let probed = u64::try_from(epoch().elapsed().as_millis()).unwrap();
        let every = u64::try_from(GlobalTracer::PROBE_EVERY.as_millis()).unwrap();
        assert!(
            due > probed.saturating_sub(every) && due <= probed + every,
            "{due} {probed}"
        );
        // Until then, no lookup at all.
        global.next_probe_ms.store(u64::MAX, Ordering::Relaxed);
        for _ in 0..100 {
            assert!(global.get().is_none());
        }
        assert_eq!(LOOKUPS.load(Ordering::SeqCst), 1);
        INSTALLED.store(true, Ordering::SeqCst);
        // As if `PROBE_EVERY` had passed.
        global.next_probe_ms.store(0, Ordering::Relaxed);
        let spans = Spans::Global(Arc::new(global));
        let info = SpanInfo {
            system: Some("test"),
            destination: Some("orders"),
            ..SpanInfo::default()
        };
        let cx = spans.start(&info, &Context::new(), Vec::new(), None);
        let cx = cx.expect("a span once the SDK is there");
        assert!(cx.span().span_context().is_valid());
        // A real tracer, once found, is kept, and the provider is not asked again.
        INSTALLED.store(false, Ordering::SeqCst);
        assert!(spans
            .start(&info, &Context::new(), Vec::new(), None)
            .is_some());
        assert_eq!(LOOKUPS.load(Ordering::SeqCst), 2);
    }
}
