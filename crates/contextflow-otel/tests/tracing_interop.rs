//! Interoperation with `tracing-opentelemetry`: tracing spans inside a request continue the
//! request's remote trace, also in children spawned through contextflow.
//! Installs a global subscriber and a carrier, hence its own test binary.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

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

/// A span processor that keeps every ended span in memory.
#[derive(Debug, Clone, Default)]
struct Collect(Arc<Mutex<Vec<SpanData>>>);

impl SpanProcessor for Collect {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}
    fn on_end(&self, span: SpanData) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

impl Collect {
    fn take(&self) -> Vec<SpanData> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

fn remote_parent(n: u64) -> SpanContext {
    SpanContext::new(
        TraceId::from(0xabc0_0000 + u128::from(n)),
        SpanId::from(0x100 + n),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    )
}

async fn handler(n: u64) -> SpanId {
    let handler_span = info_span!("handler", n);
    async move {
        // The tracing span is active in OpenTelemetry's context too (context activation).
        let handler_id = contextflow_otel::current_span_id().unwrap();
        assert_ne!(handler_id, SpanId::from(0x100 + n));
        // A child task without `.in_current_span()`: its root tracing span still joins the
        // trace, under the handler span, because the OpenTelemetry context was carried.
        contextflow::spawn(async move {
            let _db = info_span!("db", n).entered();
        })
        .await
        .unwrap();
        contextflow::spawn_blocking(move || {
            let _render = info_span!("render", n).entered();
        })
        .await
        .unwrap();
        handler_id
    }
    .instrument(handler_span)
    .await
}

#[test]
fn tracing_spans_join_the_request_trace() {
    contextflow_otel::carry_context();
    let collect = Collect::default();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(collect.clone())
        .build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .init();

    for multi_thread in [false, true] {
        let rt = if multi_thread {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread().build()
        }
        .unwrap();
        let seen_ids = rt.block_on(async {
            let handles: Vec<_> = (0..20u64)
                .map(|n| {
                    contextflow::spawn(contextflow_otel::in_remote_context(
                        remote_parent(n),
                        handler(n),
                    ))
                })
                .collect();
            let mut ids = Vec::new();
            for h in handles {
                ids.push(h.await.unwrap());
            }
            ids
        });

        let spans = collect.take();
        assert_eq!(spans.len(), 20 * 3);
        let n_of = |s: &SpanData| {
            s.attributes
                .iter()
                .find(|kv| kv.key.as_str() == "n")
                .map(|kv| kv.value.as_str().parse::<u64>().unwrap())
                .unwrap()
        };
        for span in &spans {
            let n = n_of(span);
            let parent = remote_parent(n);
            assert_eq!(span.span_context.trace_id(), parent.trace_id(), "{span:?}");
            if span.name == "handler" {
                // `current_span_id()` inside the tracing span was this span's id.
                assert_eq!(seen_ids[n as usize], span.span_context.span_id());
                assert_eq!(span.parent_span_id, parent.span_id());
                assert!(span.parent_span_is_remote);
            } else {
                let handler = spans
                    .iter()
                    .find(|s| s.name == "handler" && n_of(s) == n)
                    .unwrap();
                assert_eq!(
                    span.parent_span_id,
                    handler.span_context.span_id(),
                    "{span:?}"
                );
            }
        }
    }
}
