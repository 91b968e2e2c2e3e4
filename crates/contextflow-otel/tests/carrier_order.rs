//! Review finding: with a tracing span carrier registered before OpenTelemetry's (what
//! `contextflow-tracing`'s set-up and `carry_spans(); carry_context();` do), a child task ran
//! with the span entered inside the captured `Context`: `tracing-opentelemetry`'s context
//! activation then attached the span's own context over it, and the child continued the
//! connection span's trace instead of the request's. OpenTelemetry's carrier is now entered
//! innermost, whatever the order of registration.
//! Registers carriers and a global subscriber in that order, hence its own test binary.

use contextflow::carry::{self, Carrier};
use opentelemetry::{
    baggage::BaggageExt as _,
    trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        TracerProvider as _,
    },
    Context, KeyValue,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{info_span, Instrument as _, Span};
use tracing_subscriber::prelude::*;

/// What `contextflow-tracing`'s `SpanCarrier` does.
struct Spans;

impl Carrier for Spans {
    type Value = Span;

    fn capture(&self) -> Option<Span> {
        let span = Span::current();
        (!span.is_none()).then_some(span)
    }

    fn enter(&self, span: &Span, f: &mut dyn FnMut()) {
        span.in_scope(f)
    }
}

const REQUEST_TRACE: u128 = 0xabc0_0001;

async fn child_sees_the_request() {
    let connection = info_span!("connection");
    async {
        let request = Context::new()
            .with_remote_span_context(SpanContext::new(
                TraceId::from(REQUEST_TRACE),
                SpanId::from(0x101),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            ))
            .with_baggage([KeyValue::new("user", "alice")]);
        contextflow_otel::scope(request, async {
            let here = contextflow_otel::current_trace_id();
            assert_eq!(here, Some(TraceId::from(REQUEST_TRACE)));
            let (trace, user) = contextflow::spawn(async {
                let user =
                    Context::map_current(|cx| cx.baggage().get("user").map(|v| v.to_string()));
                (contextflow_otel::current_trace_id(), user)
            })
            .await
            .unwrap();
            assert_eq!(trace, here, "the child continues the request's trace");
            assert_eq!(user.as_deref(), Some("alice"), "and has its baggage");
        })
        .await
    }
    .instrument(connection)
    .await
}

#[test]
fn a_child_sees_the_context_of_its_spawn_whatever_the_order_of_registration() {
    assert!(carry::register(Spans));
    assert!(contextflow_otel::carry_context());
    let provider = SdkTracerProvider::builder().build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .init();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(child_sees_the_request());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(child_sees_the_request());
}
