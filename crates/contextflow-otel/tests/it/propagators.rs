//! The propagators through OpenTelemetry's `TextMapPropagator` API.

use std::collections::HashMap;

use contextflow_otel::{
    carrier::{InjectFn, Pairs},
    default_propagator, BaggagePropagator, Propagation, RequestId, TraceContextPropagator,
};
use opentelemetry::{
    baggage::BaggageExt as _,
    propagation::{TextMapCompositePropagator, TextMapPropagator},
    trace::TraceContextExt as _,
    Context,
};

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn round_trip(p: &dyn TextMapPropagator, pairs: &[(&str, &str)]) -> HashMap<String, String> {
    let cx = p.extract(&Pairs::new(pairs.iter().copied()));
    let mut out = HashMap::new();
    p.inject_context(&cx, &mut out);
    out
}

#[test]
fn the_full_tracestate_travels_even_where_otel_keeps_less() {
    let out = round_trip(
        &TraceContextPropagator::new(),
        &[
            ("traceparent", TP),
            ("tracestate", "foo@@bar=1,a=2,foo@bar@baz=3"),
        ],
    );
    assert_eq!(out["tracestate"], "foo@@bar=1,a=2,foo@bar@baz=3");
    // A span that changed the OpenTelemetry trace state wins over the stored list.
    let cx = TraceContextPropagator::new().extract(&Pairs::new([
        ("traceparent", TP),
        ("tracestate", "foo@@bar=1,a=2"),
    ]));
    let sc = cx.span().span_context().clone();
    let changed = opentelemetry::trace::SpanContext::new(
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags(),
        true,
        sc.trace_state().insert("mine", "x").unwrap(),
    );
    let mut out = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx.with_remote_span_context(changed), &mut out);
    assert_eq!(out["tracestate"], "mine=x,a=2");
}

#[test]
fn a_malformed_traceparent_drops_the_tracestate() {
    let out = round_trip(
        &TraceContextPropagator::new(),
        &[("traceparent", "00-xyz"), ("tracestate", "a=1")],
    );
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn nothing_is_injected_without_a_valid_span() {
    let mut out = HashMap::new();
    default_propagator().inject_context(&Context::new(), &mut out);
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn baggage_keeps_valid_members_and_properties() {
    let out = round_trip(
        &BaggagePropagator::new(),
        &[
            ("baggage", "a=1;p=x%20y,bad key=2"),
            ("baggage", "b=%E2%82%AC"),
        ],
    );
    let sent = contextflow_otel::Baggage::parse(&out["baggage"]);
    assert_eq!(sent.get("a"), Some("1"));
    assert_eq!(sent.get("b"), Some("\u{20ac}"));
    assert_eq!(sent.len(), 2);
    let props: Vec<_> = sent.member("a").unwrap().properties().collect();
    assert_eq!(props, [("p", Some("x y"))]);
}

#[test]
fn extracted_baggage_is_opentelemetry_baggage() {
    let cx = default_propagator().extract(&Pairs::new([("baggage", "env=staging")]));
    assert_eq!(cx.baggage().get("env").map(|v| v.as_str()), Some("staging"));
}

#[test]
fn composes_with_other_propagators() {
    let composite = TextMapCompositePropagator::new(vec![
        Box::new(contextflow_otel::RequestIdPropagator::new()),
        Box::new(BaggagePropagator::new()),
        Box::new(TraceContextPropagator::new()),
    ]);
    let out = round_trip(
        &composite,
        &[
            ("traceparent", TP),
            ("baggage", "k=v"),
            ("x-request-id", "r-1"),
        ],
    );
    assert_eq!(out["traceparent"], TP);
    assert_eq!(out["baggage"], "k=v");
    assert_eq!(out["x-request-id"], "r-1");
}

#[test]
fn propagation_always_carries_a_request_id() {
    let p = Propagation::with_propagator(TraceContextPropagator::new());
    let cx = p.extract(&Pairs::new([("traceparent", TP)]));
    let id = cx.get::<RequestId>().unwrap().clone();
    let mut out = Vec::new();
    p.inject(
        &cx,
        &mut InjectFn(|k: &str, v: String| out.push((k.to_owned(), v))),
    );
    out.sort();
    assert_eq!(
        out,
        [
            ("traceparent".to_owned(), TP.to_owned()),
            ("x-request-id".to_owned(), id.as_str().to_owned())
        ]
    );
    assert_eq!(p.fields(), ["traceparent", "tracestate", "x-request-id"]);
}

#[test]
fn over_long_values_are_ignored_by_extract() {
    let long = format!("{TP}{}", " ".repeat(9000));
    let cx = contextflow_otel::extract(&Pairs::new([("traceparent", long.as_str())]));
    assert!(!cx.span().span_context().is_valid());
}
