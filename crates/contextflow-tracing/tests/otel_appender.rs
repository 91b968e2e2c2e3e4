//! Context fields reach sinks other than `fmt` (issue 13, item 6): OpenTelemetry's tracing log
//! appender, wrapped by `ContextFields::layer`, exports every record with `request_id`,
//! `tenant`, `trace_id` and `span_id`, and the ids are those of the active OpenTelemetry span.

use std::collections::HashMap;

use contextflow::AsyncLocal;
use contextflow_tracing::ContextFields;
use opentelemetry::{
    logs::AnyValue,
    trace::{FutureExt as _, SpanContext, TraceContextExt, Tracer, TracerProvider as _},
    Context,
};
use opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge;
use opentelemetry_sdk::{
    logs::{InMemoryLogExporter, SdkLogRecord, SdkLoggerProvider},
    trace::SdkTracerProvider,
};
use tracing_subscriber::prelude::*;

static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");

/// The fields of every record: two contextflow variables and the ids of OpenTelemetry's
/// current span.
fn fields() -> ContextFields {
    ContextFields::new()
        .field("request_id", &REQUEST_ID)
        .field("tenant", &TENANT)
        .field_fn("trace_id", || {
            Context::map_current(|cx| {
                let span = cx.span();
                let sc = span.span_context();
                sc.is_valid().then(|| sc.trace_id())
            })
        })
        .field_fn("span_id", || {
            Context::map_current(|cx| {
                let span = cx.span();
                let sc = span.span_context();
                sc.is_valid().then(|| sc.span_id())
            })
        })
}

fn attributes(record: &SdkLogRecord) -> HashMap<String, AnyValue> {
    record
        .attributes_iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
        .collect()
}

fn string(value: Option<&AnyValue>) -> Option<String> {
    match value? {
        AnyValue::String(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Runs `requests` concurrent requests, each in its own OpenTelemetry span and contextflow
/// scopes, logging across awaits; returns each request's span context by request id.
async fn run_requests(
    tracer: &opentelemetry_sdk::trace::SdkTracer,
    requests: u32,
) -> HashMap<String, SpanContext> {
    let mut handles = Vec::new();
    for i in 0..requests {
        let span = tracer.start(format!("request {i}"));
        let cx = Context::current_with_span(span);
        let span_context = cx.span().span_context().clone();
        let id = format!("req-{i}");
        let request = REQUEST_ID.scope(
            id.clone(),
            TENANT.scope(format!("tenant-{}", i % 3), async move {
                tracing::info!(step = 1, "request started");
                tokio::task::yield_now().await;
                tracing::warn!(step = 2, amount = 12.5, ok = true, "half way");
                tokio::task::yield_now().await;
                tracing::error!(step = 3u64, reference = "R1\nforged", "request finished");
            }),
        );
        handles.push((id, span_context, tokio::spawn(request.with_context(cx))));
    }
    let mut spans = HashMap::new();
    for (id, span_context, handle) in handles {
        handle.await.unwrap();
        spans.insert(id, span_context);
    }
    spans
}

fn check(exporter: &InMemoryLogExporter, spans: &HashMap<String, SpanContext>) {
    let logs = exporter.get_emitted_logs().unwrap();
    assert_eq!(logs.len(), spans.len() * 3 + 1);
    let mut per_request: HashMap<String, usize> = HashMap::new();
    for log in &logs {
        let record = &log.record;
        let attrs = attributes(record);
        let Some(request_id) = string(attrs.get("request_id")) else {
            // The one event outside any request: no context field at all.
            for key in ["tenant", "trace_id", "span_id"] {
                assert!(!attrs.contains_key(key), "{attrs:?}");
            }
            assert!(record.trace_context().is_none());
            continue;
        };
        let expected = &spans[&request_id];
        let i: u32 = request_id["req-".len()..].parse().unwrap();
        assert_eq!(
            string(attrs.get("tenant")).as_deref(),
            Some(format!("tenant-{}", i % 3).as_str())
        );
        let trace_id = string(attrs.get("trace_id")).expect("trace_id on every record");
        let span_id = string(attrs.get("span_id")).expect("span_id on every record");
        assert_eq!(trace_id, expected.trace_id().to_string(), "{attrs:?}");
        assert_eq!(span_id, expected.span_id().to_string(), "{attrs:?}");
        // The record's own trace context (set by the SDK from the active span) agrees.
        let tc = record.trace_context().expect("active span");
        assert_eq!(tc.trace_id, expected.trace_id());
        assert_eq!(tc.span_id, expected.span_id());
        // The event's own fields keep their types.
        match attrs.get("step") {
            Some(AnyValue::Int(1)) => {}
            Some(AnyValue::Int(2)) => {
                assert_eq!(
                    attrs.get("amount"),
                    Some(&AnyValue::Double(12.5)),
                    "{attrs:?}"
                );
                assert_eq!(attrs.get("ok"), Some(&AnyValue::Boolean(true)), "{attrs:?}");
            }
            Some(AnyValue::Int(3)) => {
                // Structured sinks keep values as they are.
                assert_eq!(
                    string(attrs.get("reference")).as_deref(),
                    Some("R1\nforged"),
                    "{attrs:?}"
                );
            }
            other => panic!("step {other:?}: {attrs:?}"),
        }
        assert!(record.body().is_some());
        *per_request.entry(request_id).or_default() += 1;
    }
    assert_eq!(per_request.len(), spans.len());
    assert!(per_request.values().all(|n| *n == 3), "{per_request:?}");
}

/// Installs a global subscriber (worker threads log too), hence its own test binary and a
/// single test covering both runtimes.
#[test]
fn every_record_carries_the_context_fields_and_the_active_span_ids() {
    let exporter = InMemoryLogExporter::default();
    let logs = SdkLoggerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let traces = SdkTracerProvider::builder().build();
    let tracer = traces.tracer("contextflow-tracing-test");
    tracing_subscriber::registry()
        .with(fields().layer(OpenTelemetryTracingBridge::new(&logs)))
        .init();

    for multi_thread in [false, true] {
        exporter.reset();
        let rt = if multi_thread {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread().build()
        }
        .unwrap();
        tracing::info!("outside any request");
        let spans = rt.block_on(run_requests(&tracer, 20));
        check(&exporter, &spans);
    }
}
