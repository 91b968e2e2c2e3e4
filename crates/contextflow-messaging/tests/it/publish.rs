//! The publish side: what an outgoing message carries.

use std::collections::BTreeMap;

use contextflow_messaging::{Consumer, Publisher};
use contextflow_otel::carrier::{InjectFn, Pairs};

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn inject(publisher: &Publisher) -> BTreeMap<String, String> {
    let mut headers = BTreeMap::new();
    publisher.inject(&mut InjectFn(|k: &str, v: String| {
        headers.insert(k.to_owned(), v);
    }));
    headers
}

#[test]
fn writes_the_current_context_and_nothing_else() {
    let cx = contextflow_otel::extract(&Pairs::new([
        ("traceparent", PARENT),
        ("x-request-id", "order-1"),
        ("baggage", "env=staging"),
    ]));
    let headers = contextflow_otel::sync_scope(cx, || inject(&Publisher::new()));
    assert_eq!(headers["traceparent"], PARENT);
    assert_eq!(headers["x-request-id"], "order-1");
    assert_eq!(headers["baggage"], "env=staging");
    assert_eq!(headers.len(), 3, "{headers:?}");
}

#[test]
fn publish_then_consume_round_trips() {
    let cx = contextflow_otel::extract(&Pairs::new([
        ("traceparent", PARENT),
        ("x-request-id", "order-2"),
    ]));
    let headers = contextflow_otel::sync_scope(cx, || inject(&Publisher::new()));
    let metadata = Pairs::new(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let seen = Consumer::new().without_spans().run(&metadata, || {
        (
            contextflow_otel::current_request_id().unwrap().to_string(),
            contextflow_otel::current_trace_id().unwrap().to_string(),
            contextflow_otel::current_span_id().unwrap().to_string(),
        )
    });
    assert_eq!(seen.0, "order-2");
    assert_eq!(seen.1, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        seen.2, "00f067aa0ba902b7",
        "the producer's span is the remote parent"
    );
}
