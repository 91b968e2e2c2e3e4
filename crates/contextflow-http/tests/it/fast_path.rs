//! The server's extraction fast path (`Propagation::extract_parts_from` over a `HeaderMap`)
//! gives what the `Extractor` path gives, for any headers.

use contextflow_http::HeaderExtractor;
use contextflow_otel::{Propagation, TraceContextPropagator};
use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{baggage::BaggageExt as _, trace::TraceContextExt as _, Context};
use proptest::prelude::*;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Values that exercise every branch: valid, malformed, empty, over-long, not visible ASCII.
fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(TP.as_bytes().to_vec()),
        Just(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g".to_vec()),
        Just(b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".to_vec()),
        Just(b"foo@@bar=1".to_vec()),
        Just(b"env=staging,user=al%20ice;p=1".to_vec()),
        Just(b"bad key=1".to_vec()),
        Just(b"r-1".to_vec()),
        Just(b"two words".to_vec()),
        Just(b"caf\xc3\xa9".to_vec()),
        Just(b"env=prod,note=caf\xc3\xa9,user=al".to_vec()),
        Just(b"".to_vec()),
        Just(vec![b'a'; 8193]),
        Just(vec![b'a'; 129]),
        proptest::collection::vec(0x20u8..0x7f, 0..40),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(usize, Vec<u8>)>> {
    proptest::collection::vec((0usize..5, value()), 0..8)
}

fn header_map(pairs: &[(usize, Vec<u8>)], many: usize) -> HeaderMap {
    const NAMES: [&str; 5] = [
        "traceparent",
        "tracestate",
        "baggage",
        "x-request-id",
        "other",
    ];
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            map.append(HeaderName::from_static(NAMES[*name]), value);
        }
    }
    for _ in 0..many {
        map.append("x-request-id", HeaderValue::from_static("r-2"));
    }
    map
}

fn same(propagation: &Propagation, map: &HeaderMap) -> Result<(), TestCaseError> {
    let (slow_cx, slow_id) = propagation.extract_parts(&Context::new(), &HeaderExtractor(map));
    let (fast_cx, fast_id) = propagation.extract_parts_from(&Context::new(), &HeaderExtractor(map));
    let (slow_span, fast_span) = (slow_cx.span(), fast_cx.span());
    prop_assert_eq!(slow_span.span_context(), fast_span.span_context());
    let bag = |cx: &Context| {
        let mut members: Vec<(String, String)> = cx
            .baggage()
            .iter()
            .map(|(k, (v, _))| (k.to_string(), v.to_string()))
            .collect();
        members.sort();
        members
    };
    prop_assert_eq!(bag(&slow_cx), bag(&fast_cx));
    let mut inject_slow = std::collections::HashMap::new();
    let mut inject_fast = std::collections::HashMap::new();
    propagation.inject(&slow_cx, &mut inject_slow);
    propagation.inject(&fast_cx, &mut inject_fast);
    prop_assert_eq!(
        inject_slow.get("tracestate"),
        inject_fast.get("tracestate"),
        "the full tracestate is kept the same way"
    );
    // A fresh id is random: both paths keep the caller's id or both make a new one.
    let kept = |id: &contextflow_otel::RequestId| {
        map.get_all("x-request-id")
            .iter()
            .any(|v| v.as_bytes() == id.as_str().as_bytes())
    };
    prop_assert_eq!(kept(&slow_id), kept(&fast_id));
    if kept(&slow_id) {
        prop_assert_eq!(slow_id, fast_id);
    }
    Ok(())
}

proptest! {
    #[test]
    fn fast_path_matches_the_extractor_path(pairs in headers(), many in prop_oneof![Just(0usize), Just(70usize)]) {
        let map = header_map(&pairs, many);
        same(&Propagation::global(), &map)?;
        same(&Propagation::with_propagator(TraceContextPropagator::new()), &map)?;
    }
}

#[test]
fn fast_path_reads_the_common_request() {
    let mut map = HeaderMap::new();
    map.insert("traceparent", HeaderValue::from_static(TP));
    map.insert("baggage", HeaderValue::from_static("env=staging"));
    map.insert("x-request-id", HeaderValue::from_static("r-1"));
    let (cx, id) =
        Propagation::global().extract_parts_from(&Context::new(), &HeaderExtractor(&map));
    assert_eq!(
        cx.span().span_context().trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert!(cx.span().span_context().is_remote());
    assert_eq!(cx.baggage().get("env").map(|v| v.as_str()), Some("staging"));
    assert_eq!(id.as_str(), "r-1");
}
