//! Other trace formats by configuration, end to end through the server and client layers with
//! real headers: B3 (single and multiple headers, `opentelemetry-zipkin`'s propagator) and
//! Datadog (`x-datadog-*`). The server extracts, starts its span under the caller's, and the
//! client injects the same trace with the server span as parent. Installs a global
//! propagator, hence its own test binary.
//!
//! No Datadog propagator is published for OpenTelemetry 0.33 (`opentelemetry-datadog` is
//! deprecated and pinned to 0.32), so this file carries a minimal one, as a user would: the
//! point is that any `TextMapPropagator` plugs in.
// opentelemetry-zipkin 0.33 marks its whole crate deprecated (the exporter gives way to OTLP);
// its B3 propagator is still the ecosystem's one.
#![allow(deprecated)]

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};

use contextflow_http::{InjectContextLayer, PropagateContextLayer};
use http::{HeaderMap, Request, Response};
use opentelemetry::{
    propagation::{
        text_map_propagator::FieldIter, Extractor, Injector, TextMapCompositePropagator,
        TextMapPropagator,
    },
    trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        TracerProvider as _,
    },
    Context,
};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracer, SdkTracerProvider, SpanData};
use opentelemetry_zipkin::{B3Encoding, Propagator as B3};
use tower::{service_fn, Layer, ServiceExt};

/// Datadog's headers: decimal 64-bit trace id (the low half of the W3C id) and parent id.
#[derive(Debug)]
struct Datadog {
    fields: [String; 3],
}

impl Datadog {
    fn new() -> Self {
        Datadog {
            fields: [
                "x-datadog-trace-id".into(),
                "x-datadog-parent-id".into(),
                "x-datadog-sampling-priority".into(),
            ],
        }
    }
}

impl TextMapPropagator for Datadog {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return;
        }
        let trace = u128::from_be_bytes(sc.trace_id().to_bytes()) as u64;
        let parent = u64::from_be_bytes(sc.span_id().to_bytes());
        injector.set("x-datadog-trace-id", trace.to_string());
        injector.set("x-datadog-parent-id", parent.to_string());
        injector.set(
            "x-datadog-sampling-priority",
            if sc.is_sampled() { "1" } else { "0" }.into(),
        );
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        let parse = |key| {
            extractor
                .get(key)
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(trace), Some(parent)) =
            (parse("x-datadog-trace-id"), parse("x-datadog-parent-id"))
        else {
            return cx.clone();
        };
        let sampled = parse("x-datadog-sampling-priority").is_some_and(|p| p > 0);
        let sc = SpanContext::new(
            TraceId::from(u128::from(trace)),
            SpanId::from(parent),
            if sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            true,
            TraceState::default(),
        );
        if sc.is_valid() {
            cx.with_remote_span_context(sc)
        } else {
            cx.clone()
        }
    }

    fn fields(&self) -> FieldIter<'_> {
        FieldIter::new(&self.fields)
    }
}

fn tracer() -> (SdkTracer, SdkTracerProvider, InMemorySpanExporter) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    (provider.tracer("formats"), provider, exporter)
}

/// Sends `incoming` headers through `server` (a layer in front of a handler that calls out
/// through `client`); returns the headers the client sent and the exported server span.
fn round_trip(
    server: PropagateContextLayer,
    client: InjectContextLayer,
    incoming: &[(&str, &str)],
    provider: &SdkTracerProvider,
    exporter: &InMemorySpanExporter,
) -> (HeaderMap, SpanData) {
    let sent = Arc::new(Mutex::new(HeaderMap::new()));
    let sent2 = sent.clone();
    let outgoing = client.layer(service_fn(move |req: Request<()>| {
        *sent2.lock().unwrap() = req.headers().clone();
        async { Ok::<_, Infallible>(Response::new(())) }
    }));
    let svc = server.layer(service_fn(move |_req: Request<()>| {
        let outgoing = outgoing.clone();
        async move {
            outgoing.oneshot(Request::new(())).await?;
            Ok::<_, Infallible>(Response::new(()))
        }
    }));
    let mut req = Request::new(());
    for (k, v) in incoming {
        req.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    for rt in [
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap(),
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap(),
    ] {
        let res = rt
            .block_on(svc.clone().oneshot(clone_request(&req)))
            .unwrap();
        drop(res); // the body's end ends the server span
    }
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    exporter.reset();
    assert_eq!(spans.len(), 2, "one server span per runtime: {spans:#?}");
    assert_eq!(spans[0].parent_span_id, spans[1].parent_span_id);
    let headers = sent.lock().unwrap().clone();
    (headers, spans[1].clone())
}

fn clone_request(req: &Request<()>) -> Request<()> {
    let mut out = Request::new(());
    *out.headers_mut() = req.headers().clone();
    out
}

const B3_TRACE: &str = "80f198ee56343ba864fe8b2a57d3eff7";
const B3_SPAN: &str = "e457b5a2e4d86bd1";

#[test]
fn b3_and_datadog_by_configuration() {
    let (tracer, provider, exporter) = tracer();

    // 1. B3 single header, given to the layers explicitly.
    let (sent, server_span) = round_trip(
        PropagateContextLayer::new()
            .with_propagator(B3::new())
            .with_tracer(tracer.clone()),
        InjectContextLayer::new().with_propagator(B3::with_encoding(B3Encoding::SingleHeader)),
        &[("b3", &format!("{B3_TRACE}-{B3_SPAN}-1"))],
        &provider,
        &exporter,
    );
    assert_eq!(server_span.span_context.trace_id().to_string(), B3_TRACE);
    assert_eq!(server_span.parent_span_id.to_string(), B3_SPAN);
    assert!(server_span.parent_span_is_remote);
    let b3 = sent["b3"].to_str().unwrap().to_owned();
    let parts: Vec<&str> = b3.split('-').collect();
    assert_eq!(parts[0], B3_TRACE, "same trace");
    assert_ne!(parts[1], B3_SPAN, "the server span is the parent");
    assert_eq!(parts[2], "1");
    assert!(
        sent.contains_key("x-request-id"),
        "the request id travels too"
    );

    // 2. B3 multiple headers and Datadog, as the global propagator (no layer configuration).
    opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(B3::with_encoding(B3Encoding::MultipleHeader)),
        Box::new(Datadog::new()),
    ]));
    let (sent, server_span) = round_trip(
        PropagateContextLayer::new().with_tracer(tracer.clone()),
        InjectContextLayer::new(),
        &[
            ("X-B3-TraceId", B3_TRACE),
            ("X-B3-SpanId", B3_SPAN),
            ("X-B3-Sampled", "1"),
        ],
        &provider,
        &exporter,
    );
    assert_eq!(server_span.span_context.trace_id().to_string(), B3_TRACE);
    assert_eq!(server_span.parent_span_id.to_string(), B3_SPAN);
    assert_eq!(sent["x-b3-traceid"], B3_TRACE);
    assert_ne!(sent["x-b3-spanid"], B3_SPAN);
    assert!(
        !sent.contains_key("traceparent"),
        "only the configured formats are written"
    );
    // The same trace in Datadog's words: the low 64 bits of the trace id, in decimal.
    let low = u64::from_str_radix(&B3_TRACE[16..], 16).unwrap();
    assert_eq!(sent["x-datadog-trace-id"], low.to_string());

    // 3. Datadog headers in: the trace continues under Datadog's ids.
    let (sent, server_span) = round_trip(
        PropagateContextLayer::new().with_tracer(tracer),
        InjectContextLayer::new(),
        &[
            ("x-datadog-trace-id", "5208512171318403364"),
            ("x-datadog-parent-id", "3875264387643812473"),
            ("x-datadog-sampling-priority", "1"),
        ],
        &provider,
        &exporter,
    );
    assert_eq!(
        server_span.span_context.trace_id(),
        TraceId::from(5_208_512_171_318_403_364u128)
    );
    assert_eq!(
        server_span.parent_span_id,
        SpanId::from(3_875_264_387_643_812_473u64)
    );
    assert_eq!(sent["x-datadog-trace-id"], "5208512171318403364");
    assert_ne!(sent["x-datadog-parent-id"], "3875264387643812473");
    assert_eq!(
        sent["x-datadog-parent-id"],
        u64::from_be_bytes(server_span.span_context.span_id().to_bytes()).to_string(),
        "the server span is the parent"
    );
}
