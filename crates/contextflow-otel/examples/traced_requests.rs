//! Two concurrent requests that continue two different remote traces. Spans started with
//! `tracing` (through `tracing-opentelemetry`) in the handler, in a spawned task and in
//! blocking work all join their own request's trace; a span processor prints each span.
//!
//! Run with: `cargo run -p contextflow-otel --example traced_requests`

use std::time::Duration;

use opentelemetry::{
    trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState, TracerProvider as _},
    Context,
};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{SdkTracerProvider, Span, SpanData, SpanProcessor},
};
use tracing::{info_span, Instrument};
use tracing_subscriber::prelude::*;

/// Prints every span when it ends.
#[derive(Debug)]
struct Print;

impl SpanProcessor for Print {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}
    fn on_end(&self, span: SpanData) {
        println!(
            "span {:<8} trace={} span={} parent={}",
            span.name,
            span.span_context.trace_id(),
            span.span_context.span_id(),
            span.parent_span_id
        );
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    contextflow_otel::carry_context();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Print)
        .build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("example")))
        .init();

    // What a server middleware extracts from each request's `traceparent` header.
    let a = remote("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let b = remote("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let first = contextflow::spawn(contextflow_otel::in_remote_context(a, handler("a")));
    let second = contextflow::spawn(contextflow_otel::in_remote_context(b, handler("b")));
    first.await.unwrap();
    second.await.unwrap();
}

fn remote(trace_id: &str, span_id: &str) -> SpanContext {
    SpanContext::new(
        TraceId::from_hex(trace_id).unwrap(),
        SpanId::from_hex(span_id).unwrap(),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    )
}

async fn handler(name: &'static str) {
    println!(
        "request {name}: trace={} remote parent={}",
        contextflow_otel::current_trace_id().unwrap(),
        contextflow_otel::current_span_id().unwrap()
    );
    async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        // No `.in_current_span()` and no `.with_current_context()`: contextflow carries it.
        contextflow::spawn(async move {
            let _db = info_span!("db").entered();
            println!(
                "request {name}: db task sees trace={}",
                contextflow_otel::current_trace_id().unwrap()
            );
        })
        .await
        .unwrap();
        contextflow::spawn_blocking(|| {
            let _render = info_span!("render").entered();
        })
        .await
        .unwrap();
    }
    .instrument(info_span!("handler"))
    .await
}
