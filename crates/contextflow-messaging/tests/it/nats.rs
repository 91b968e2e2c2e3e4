//! NATS and JetStream (`async-nats`): round trips through the real server, where the consumer
//! runs in a task with an empty context, and JetStream redelivery after a nack.

use async_nats::{
    jetstream::{self, consumer::pull, AckKind},
    Client, HeaderMap,
};
use contextflow_messaging::async_nats::{self as nats, HeaderExtractor};
use contextflow_otel::{new_span_id, new_trace_id, RequestId};
use contextflow_testenv::Service;
use futures_util::StreamExt as _;
use opentelemetry::{
    propagation::Extractor as _,
    trace::{SpanContext, TraceContextExt as _, TraceFlags, TraceState},
    Context,
};
use tokio::task::JoinSet;

async fn connect() -> Client {
    async_nats::connect(contextflow_testenv::url(Service::Nats))
        .await
        .unwrap()
}

/// A name no other test run uses (letters, digits and `-` only: valid as a stream name and
/// as a subject token).
fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", RequestId::new())
}

/// Runs `publish` for `n` request contexts of their own, concurrently; each gets the body it
/// must publish (`"{request id} {trace id}"`).
async fn publish_from_requests<F, Fut>(n: usize, publish: F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut publishers = JoinSet::new();
    for _ in 0..n {
        let request_id = RequestId::new();
        let trace_id = new_trace_id();
        let parent = SpanContext::new(
            trace_id,
            new_span_id(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = Context::new()
            .with_remote_span_context(parent)
            .with_value(request_id.clone());
        let publish = publish(format!("{request_id} {trace_id}"));
        publishers.spawn(contextflow_otel::scope(cx, async move {
            tokio::task::yield_now().await;
            assert_eq!(contextflow_otel::current_request_id(), Some(request_id));
            publish.await;
        }));
    }
    while let Some(done) = publishers.join_next().await {
        done.unwrap();
    }
}

/// Whether the current context is the one `body` was published from.
fn context_matches(body: &[u8]) -> bool {
    let body = std::str::from_utf8(body).unwrap();
    let (want_id, want_trace) = body.split_once(' ').unwrap();
    let seen_id = contextflow_otel::current_request_id().map(|id| id.to_string());
    let seen_trace = contextflow_otel::current_trace_id().map(|id| id.to_string());
    seen_id.as_deref() == Some(want_id) && seen_trace.as_deref() == Some(want_trace)
}

fn assert_empty_context() {
    assert!(contextflow_otel::current_request_id().is_none());
    assert!(contextflow_otel::current_trace_id().is_none());
}

/// Core NATS: `n` messages published at once, each from its own request, consumed
/// concurrently in a task that has no context; returns (matched, mismatched) handlers.
async fn core_round_trip(n: usize) -> (usize, usize) {
    let client = connect().await;
    let subject = unique("contextflow-core");
    // The same connection subscribes and publishes, so the server has the subscription first.
    let mut messages = client.subscribe(subject.clone()).await.unwrap();
    let consumer = nats::consumer(&subject).without_spans();
    // A plain tokio task, started outside any scope: it has an empty context.
    let consuming = tokio::spawn(async move {
        assert_empty_context();
        let mut handlers = JoinSet::new();
        for _ in 0..n {
            let message = messages.next().await.unwrap();
            let context = nats::context(&consumer, &message);
            handlers.spawn(context.scope(async move {
                // Interleave with the other handlers before looking.
                tokio::task::yield_now().await;
                context_matches(&message.payload)
            }));
        }
        let counts = count(handlers).await;
        assert_empty_context();
        counts
    });
    let publisher = client.clone();
    publish_from_requests(n, |body| {
        let client = publisher.clone();
        let subject = subject.clone();
        async move { nats::publish(&client, subject, body.into()).await.unwrap() }
    })
    .await;
    client.flush().await.unwrap();
    consuming.await.unwrap()
}

async fn count(mut handlers: JoinSet<bool>) -> (usize, usize) {
    let (mut matched, mut mismatched) = (0, 0);
    while let Some(ok) = handlers.join_next().await {
        if ok.unwrap() {
            matched += 1;
        } else {
            mismatched += 1;
        }
    }
    (matched, mismatched)
}

/// JetStream: `n` jobs published at once, each from its own request; the consumer (a task with
/// no context) nacks every first delivery and acks the redelivery. Returns (matched,
/// mismatched) handlers over both deliveries, and how many deliveries were redeliveries.
async fn jetstream_round_trip(n: usize) -> ((usize, usize), usize) {
    let client = connect().await;
    let js = jetstream::new(client);
    let name = unique("contextflow-js");
    let subject = format!("{name}.jobs");
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let worker = stream
        .create_consumer(pull::Config {
            durable_name: Some("worker".to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();

    publish_from_requests(n, |body| {
        let js = js.clone();
        let subject = subject.clone();
        async move {
            nats::jetstream_publish(&js, subject, body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    })
    .await;

    let consumer = nats::consumer(&subject).without_spans();
    let consuming = tokio::spawn(async move {
        assert_empty_context();
        let mut messages = worker.messages().await.unwrap();
        let mut handlers = JoinSet::new();
        let mut redeliveries = 0;
        // Every job comes twice: nacked the first time, acked the second.
        for _ in 0..2 * n {
            let message = messages.next().await.unwrap().unwrap();
            let first = message.info().unwrap().delivered == 1;
            if !first {
                redeliveries += 1;
            }
            let context = nats::context(&consumer, &message);
            handlers.spawn(context.scope(async move {
                tokio::task::yield_now().await;
                let ok = context_matches(&message.payload);
                let kind = if first {
                    AckKind::Nak(None)
                } else {
                    AckKind::Ack
                };
                message.ack_with(kind).await.unwrap();
                ok
            }));
        }
        let counts = count(handlers).await;
        assert_empty_context();
        (counts, redeliveries)
    });
    let out = consuming.await.unwrap();
    js.delete_stream(&name).await.unwrap();
    out
}

#[tokio::test(flavor = "current_thread")]
#[cfg_attr(not(cf_service_nats), ignore = "needs NATS: set CONTEXTFLOW_NATS_URL")]
async fn thousand_concurrent_messages_keep_their_context_current_thread() {
    assert_eq!(core_round_trip(1000).await, (1000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(cf_service_nats), ignore = "needs NATS: set CONTEXTFLOW_NATS_URL")]
async fn thousand_concurrent_messages_keep_their_context_multi_thread() {
    assert_eq!(core_round_trip(1000).await, (1000, 0));
}

#[tokio::test(flavor = "current_thread")]
#[cfg_attr(not(cf_service_nats), ignore = "needs NATS: set CONTEXTFLOW_NATS_URL")]
async fn jetstream_redelivery_after_nack_keeps_the_context_current_thread() {
    assert_eq!(jetstream_round_trip(1000).await, ((2000, 0), 1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(cf_service_nats), ignore = "needs NATS: set CONTEXTFLOW_NATS_URL")]
async fn jetstream_redelivery_after_nack_keeps_the_context_multi_thread() {
    assert_eq!(jetstream_round_trip(1000).await, ((2000, 0), 1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(cf_service_nats), ignore = "needs NATS: set CONTEXTFLOW_NATS_URL")]
async fn malformed_headers_from_the_server_give_a_fresh_context() {
    let client = connect().await;
    let subject = unique("contextflow-malformed");
    let mut messages = client.subscribe(subject.clone()).await.unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("traceparent", "00-garbage");
    headers.insert("x-request-id", "id-\u{1b}[31m");
    headers.append("baggage", "a=1");
    headers.append("baggage", &*"b=".repeat(10_000));
    client
        .publish_with_headers(subject.clone(), headers, "".into())
        .await
        .unwrap();
    let message = messages.next().await.unwrap();
    let (id, trace) = nats::scope(&nats::consumer(&subject), &message, async {
        (
            contextflow_otel::current_request_id().unwrap(),
            contextflow_otel::current_trace_id(),
        )
    })
    .await;
    assert_eq!(id.as_str().len(), 36, "a fresh id, got {id:?}");
    assert_eq!(trace, None);
}

#[test]
fn header_extractor_ignores_case_and_invalid_names() {
    let mut headers = HeaderMap::new();
    headers.insert("Traceparent", "tp");
    headers.append("baggage", "a=1");
    headers.append("baggage", "b=2");
    let extractor = HeaderExtractor::new(Some(&headers));
    assert_eq!(extractor.get("traceparent"), Some("tp"), "any ASCII case");
    assert_eq!(extractor.get_all("BAGGAGE"), Some(vec!["a=1", "b=2"]));
    assert_eq!(
        extractor.get("bad:name"),
        None,
        "not a header name: no panic"
    );
    assert_eq!(extractor.get("x-request-id"), None);
    assert_eq!(extractor.keys().len(), 2);
    assert_eq!(HeaderExtractor::new(None).get_all("baggage"), None);

    // Two spellings are two copies: a repeated request id, refused, whatever the map's order.
    let mut headers = HeaderMap::new();
    headers.insert("X-Request-Id", "forged");
    headers.insert("x-request-id", "real");
    let extractor = HeaderExtractor::new(Some(&headers));
    assert_eq!(
        extractor.get_all("x-request-id"),
        Some(vec!["forged", "real"]),
        "both spellings, in byte order of the names"
    );
    let (_, id) = contextflow_otel::Propagation::global()
        .extract_parts(&opentelemetry::Context::new(), &extractor);
    assert_eq!(id.as_str().len(), 36, "repeated: a fresh id, got {id:?}");
}

#[test]
fn header_injector_skips_values_nats_cannot_carry() {
    use opentelemetry::propagation::Injector as _;
    let mut headers = HeaderMap::new();
    let mut injector = nats::HeaderInjector::new(&mut headers);
    injector.set("x-request-id", "a\r\nb".to_owned());
    injector.set("bad:name", "v".to_owned());
    injector.set("baggage", "k=v".to_owned());
    assert_eq!(headers.len(), 1);
    assert_eq!(headers.get("baggage").map(|v| v.as_str()), Some("k=v"));
}

/// Review finding: a message republished by a publisher whose propagator writes no baggage
/// kept the first send's `baggage`, passed on as if it were the current context's.
#[test]
fn republish_with_a_narrower_propagator_drops_the_old_baggage() {
    let publisher = contextflow_messaging::Publisher::new()
        .with_propagator(contextflow_otel::TraceContextPropagator::new());
    let mut old = HeaderMap::new();
    old.insert("Baggage", "user=alice");
    old.insert("attempt", "2");
    let headers = contextflow_otel::REQUEST_ID
        .sync_scope("r-2".parse::<RequestId>().unwrap(), || {
            nats::inject(&publisher, old)
        });
    let names: Vec<&str> = headers.iter().map(|(name, _)| name.as_ref()).collect();
    assert!(
        !names.iter().any(|n| n.eq_ignore_ascii_case("baggage")),
        "{names:?}"
    );
    assert_eq!(headers.get("attempt").map(|v| v.as_str()), Some("2"));
    assert_eq!(headers.get("x-request-id").map(|v| v.as_str()), Some("r-2"));
}
