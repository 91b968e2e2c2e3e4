//! Which tracer consumer spans are started with (the global provider's by default), and the
//! OpenTelemetry messaging attributes they carry.

use std::{
    fmt,
    sync::{Arc, OnceLock},
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
    /// The global provider's tracer, looked up on first use; `None` when it is a no-op.
    Global(Arc<OnceLock<Option<BoxedTracer>>>),
    Tracer(Arc<BoxedTracer>),
    Off,
}

/// What a consumer span describes.
pub(crate) struct SpanInfo<'a> {
    pub(crate) system: Option<&'static str>,
    pub(crate) destination: Option<&'a str>,
}

impl Spans {
    pub(crate) fn global() -> Self {
        Spans::Global(Arc::new(OnceLock::new()))
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
            Spans::Global(cell) => cell
                .get_or_init(|| {
                    let tracer = opentelemetry::global::tracer(SCOPE);
                    (!is_no_op(&tracer)).then_some(tracer)
                })
                .as_ref(),
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
        let name = match info.destination {
            Some(destination) => format!("process {destination}"),
            None => "process".to_owned(),
        };
        let mut attrs = Vec::with_capacity(5);
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
        if !span.is_recording() && span.span_context() == parent.span().span_context() {
            // A no-op tracer passes the parent through: there is no span to own.
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
