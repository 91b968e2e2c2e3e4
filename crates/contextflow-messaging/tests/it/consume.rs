//! The consume side: each message's handler runs in its own context, made from its metadata.

use std::{
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex, OnceLock},
};

use contextflow::AsyncLocal;
use contextflow_messaging::{Bindings, Consumer};
use contextflow_otel::{carrier::Pairs, RequestId};
use opentelemetry::{
    baggage::BaggageExt as _,
    propagation::Extractor,
    trace::{SpanId, SpanKind, TraceId, TracerProvider as _},
    Context, KeyValue,
};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use proptest::prelude::*;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");

fn rt(multi: bool) -> tokio::runtime::Runtime {
    if multi {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }
}

/// The request id and trace id the code runs under.
type Ids = (Option<String>, Option<String>);

fn ids() -> Ids {
    (
        contextflow_otel::current_request_id().map(|id| id.to_string()),
        contextflow_otel::current_trace_id().map(|id| id.to_string()),
    )
}

#[test]
fn handler_runs_in_the_message_context_on_both_runtimes() {
    for multi in [false, true] {
        rt(multi).block_on(async {
            let consumer = Consumer::new().without_spans();
            let metadata = Pairs::new([("traceparent", PARENT), ("x-request-id", "m-1")]);
            let seen = consumer
                .scope(&metadata, async {
                    let before = ids();
                    tokio::task::yield_now().await;
                    let spawned = contextflow::spawn(async { ids() }).await.unwrap();
                    (before, ids(), spawned)
                })
                .await;
            let want = (Some("m-1".to_owned()), Some(TRACE.to_owned()));
            assert_eq!(seen.0, want, "multi={multi}");
            assert_eq!(seen.1, want, "after an await, multi={multi}");
            assert_eq!(seen.2, want, "in a spawned child, multi={multi}");
            assert_eq!(ids(), (None, None), "restored after the handler");
        });
    }
}

#[test]
fn missing_or_malformed_metadata_gives_a_fresh_request_id_and_no_trace() {
    let consumer = Consumer::new().without_spans();
    let long = "a".repeat(200);
    let cases: [(&str, Vec<(&str, &str)>); 5] = [
        ("no metadata", vec![]),
        ("request id with a newline", vec![("x-request-id", "a\nb")]),
        ("request id too long", vec![("x-request-id", &long)]),
        (
            "two request ids",
            vec![("x-request-id", "a"), ("x-request-id", "b")],
        ),
        (
            "malformed traceparent",
            vec![("traceparent", "00-zz-00f067aa0ba902b7-01")],
        ),
    ];
    for (reason, pairs) in cases {
        let (id, trace) = consumer.run(&Pairs::new(pairs), ids);
        let id = id.unwrap_or_else(|| panic!("{reason}: no request id"));
        assert_eq!(id.len(), 36, "{reason}: a fresh UUID, got {id:?}");
        assert_eq!(trace, None, "{reason}");
    }
}

#[test]
fn the_consumer_loops_own_context_does_not_leak_into_a_message() {
    let loop_cx = contextflow_otel::extract(&Pairs::new([
        (
            "traceparent",
            "00-11111111111111111111111111111111-2222222222222222-01",
        ),
        ("x-request-id", "loop"),
        ("baggage", "leak=yes"),
    ]));
    let seen = contextflow_otel::sync_scope(loop_cx, || {
        Consumer::new().without_spans().run(&Pairs::default(), || {
            (ids(), Context::current().baggage().len())
        })
    });
    assert_ne!(seen.0 .0.as_deref(), Some("loop"));
    assert_eq!(seen.0 .1, None, "no trace from the loop");
    assert_eq!(seen.1, 0, "no baggage from the loop");
}

#[test]
fn a_panicking_handler_restores_the_consumer_context() {
    rt(false).block_on(async {
        let consumer = Consumer::new().without_spans();
        let metadata = Pairs::new([("x-request-id", "boom")]);
        let fut = consumer.scope(&metadata, async { panic!("handler failed") });
        let result = futures_catch(fut).await;
        assert!(result.is_err());
        assert_eq!(ids(), (None, None));
    });
}

async fn futures_catch<F: std::future::Future>(fut: F) -> std::thread::Result<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    })
    .await
}

struct Probe(Arc<Mutex<Option<Ids>>>);

impl Drop for Probe {
    fn drop(&mut self) {
        *self.0.lock().unwrap() = Some(ids());
    }
}

#[test]
fn a_cancelled_handler_is_dropped_inside_the_message_context() {
    for multi in [false, true] {
        rt(multi).block_on(async {
            let seen = Arc::new(Mutex::new(None));
            let probe = Probe(seen.clone());
            let metadata = Pairs::new([("traceparent", PARENT), ("x-request-id", "gone")]);
            let fut = Consumer::new()
                .without_spans()
                .scope(&metadata, async move {
                    let _probe = probe;
                    std::future::pending::<()>().await
                });
            let task = tokio::spawn(fut);
            tokio::task::yield_now().await;
            task.abort();
            assert!(task.await.unwrap_err().is_cancelled());
            let seen = seen.lock().unwrap().take();
            assert_eq!(
                seen,
                Some((Some("gone".to_owned()), Some(TRACE.to_owned()))),
                "multi={multi}"
            );
        });
    }
}

#[test]
fn tenant_comes_only_from_a_trusting_consumer() {
    let metadata = Pairs::new([("x-tenant", "acme"), ("x-sig", "ok:acme")]);
    let forged = Pairs::new([("x-tenant", "acme"), ("x-sig", "bad")]);
    assert_eq!(Consumer::new().run(&metadata, || TENANT.get()), None);
    let trusting = Consumer::new().trust(|m: &dyn Extractor| {
        let tenant = m.get("x-tenant")?;
        // The verifier runs in the message's context already.
        assert!(contextflow_otel::current_request_id().is_some());
        (m.get("x-sig")? == format!("ok:{tenant}"))
            .then(|| Bindings::new().bind(&TENANT, tenant.to_owned()))
    });
    assert_eq!(
        trusting.run(&metadata, || (TENANT.get(), ids().0.is_some())),
        (Some("acme".to_owned()), true)
    );
    assert_eq!(trusting.run(&forged, || TENANT.get()), None);
    assert_eq!(TENANT.get(), None);
}

#[test]
fn an_outer_binding_of_the_consumer_stays_visible() {
    static WORKER: AsyncLocal<&'static str> = AsyncLocal::named("worker");
    let seen = WORKER.sync_scope("w1", || {
        Consumer::new()
            .without_spans()
            .run(&Pairs::default(), || WORKER.get())
    });
    assert_eq!(seen, Some("w1"));
}

/// A binding made around the handler's future by whoever polls it (the consumer loop, a
/// wrapper) stays visible inside, with the trusted bindings on top (issue 8: the consumer
/// captured the frame when the context was made and replaced the poller's).
#[test]
fn a_binding_made_by_the_poller_stays_visible() {
    static WORKER: AsyncLocal<u32> = AsyncLocal::named("worker");
    for multi in [false, true] {
        rt(multi).block_on(async {
            let consumer = Consumer::new()
                .without_spans()
                .trust(|_: &dyn Extractor| Some(Bindings::new().bind(&TENANT, "acme".to_owned())));
            let metadata = Pairs::new([("x-request-id", "m-outer")]);
            let fut = consumer.scope(&metadata, async {
                tokio::task::yield_now().await;
                (WORKER.get(), TENANT.get(), ids().0)
            });
            let seen = tokio::spawn(WORKER.scope(3, fut)).await.unwrap();
            assert_eq!(
                seen,
                (Some(3), Some("acme".to_owned()), Some("m-outer".to_owned())),
                "multi={multi}"
            );
            // A context made earlier and run later layers over the frame current then.
            let message = consumer.context(&metadata);
            let later = WORKER.sync_scope(4, || message.run(|| (WORKER.get(), TENANT.get())));
            assert_eq!(later, (Some(4), Some("acme".to_owned())), "multi={multi}");
            let snapshot = WORKER.sync_scope(5, || message.snapshot());
            assert_eq!(snapshot.get(&WORKER), Some(5));
            assert_eq!(snapshot.get(&TENANT).as_deref(), Some("acme"));
            message.finish();
        });
    }
}

fn telemetry() -> &'static (SdkTracerProvider, InMemorySpanExporter) {
    static TELEMETRY: OnceLock<(SdkTracerProvider, InMemorySpanExporter)> = OnceLock::new();
    TELEMETRY.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        (provider, exporter)
    })
}

#[test]
fn consumer_span_is_a_child_of_the_producer_span() {
    let (provider, exporter) = telemetry();
    let consumer = Consumer::new()
        .with_tracer(provider.tracer("test-child"))
        .system("rabbitmq")
        .destination("orders-child");
    let metadata = Pairs::new([("traceparent", PARENT), ("x-request-id", "m-span")]);
    let inside = consumer.run(&metadata, || {
        (ids(), contextflow_otel::current_span_id().unwrap())
    });
    let spans = exporter.get_finished_spans().unwrap();
    let span = spans
        .iter()
        .find(|s| s.name == "process orders-child")
        .expect("a consumer span");
    assert_eq!(span.span_kind, SpanKind::Consumer);
    assert_eq!(
        span.span_context.trace_id(),
        TraceId::from_hex(TRACE).unwrap()
    );
    assert_eq!(
        span.parent_span_id,
        SpanId::from_hex("00f067aa0ba902b7").unwrap()
    );
    assert!(span.parent_span_is_remote);
    // And linked to it, as the messaging conventions ask of a `process` span.
    let linked: Vec<SpanId> = span
        .links
        .iter()
        .map(|link| link.span_context.span_id())
        .collect();
    assert_eq!(linked, [SpanId::from_hex("00f067aa0ba902b7").unwrap()]);
    assert_eq!(
        inside.1,
        span.span_context.span_id(),
        "handler runs in the span"
    );
    assert_eq!(inside.0 .1.as_deref(), Some(TRACE));
    for (key, value) in [
        ("messaging.system", "rabbitmq"),
        ("messaging.operation.type", "process"),
        ("messaging.destination.name", "orders-child"),
    ] {
        assert!(
            span.attributes.contains(&KeyValue::new(key, value)),
            "{key}: {:?}",
            span.attributes
        );
    }
}

#[test]
fn batch_span_links_each_message_context() {
    let (provider, exporter) = telemetry();
    let consumer = Consumer::new()
        .with_tracer(provider.tracer("test-batch"))
        .destination("orders-batch");
    // Each message brings its own request id: the batch's is a fresh one, none of theirs
    // (the first message's would put the whole batch under one request).
    let a = Pairs::new([("traceparent", PARENT), ("x-request-id", "msg-a")]);
    let b = Pairs::new([
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("x-request-id", "msg-b"),
    ]);
    let c = Pairs::new([("traceparent", "garbage"), ("x-request-id", "msg-c")]);
    let id = consumer.run_batch(&[&a, &b, &c]);
    assert!(!id.starts_with("msg-"), "{id}");
    let spans = exporter.get_finished_spans().unwrap();
    let span = spans
        .iter()
        .find(|s| s.name == "process orders-batch")
        .expect("a batch span");
    assert_eq!(span.parent_span_id, SpanId::INVALID, "a new root");
    let linked: Vec<String> = span
        .links
        .iter()
        .map(|l| l.span_context.span_id().to_string())
        .collect();
    assert_eq!(linked, ["00f067aa0ba902b7", "b7ad6b7169203331"]);
    assert!(span
        .attributes
        .contains(&KeyValue::new("messaging.batch.message_count", 3)));
    assert_eq!(id.len(), 36);
}

trait RunBatch {
    fn run_batch(&self, metadata: &[&Pairs<'_>]) -> String;
}

impl RunBatch for Consumer {
    fn run_batch(&self, metadata: &[&Pairs<'_>]) -> String {
        let batch = self.batch_context(metadata.iter().map(|m| *m as &dyn Extractor));
        let id = batch.run(|| contextflow_otel::current_request_id().unwrap());
        batch.finish();
        id.to_string()
    }
}

#[test]
fn cancelled_handler_span_is_marked() {
    let (provider, exporter) = telemetry();
    let consumer = Consumer::new()
        .with_tracer(provider.tracer("test-cancel"))
        .destination("orders-cancel");
    drop(consumer.scope(&Pairs::default(), std::future::pending::<()>()));
    let spans = exporter.get_finished_spans().unwrap();
    let span = spans
        .iter()
        .find(|s| s.name == "process orders-cancel")
        .expect("the span ends when the handler is dropped");
    assert!(span
        .attributes
        .contains(&KeyValue::new("error.type", "cancelled")));
}

#[test]
fn panicking_handler_span_is_marked() {
    let (provider, exporter) = telemetry();
    let consumer = Consumer::new()
        .with_tracer(provider.tracer("test-panic"))
        .destination("orders-panic");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let task = rt.spawn(consumer.scope(&Pairs::default(), async {
        panic!("the handler fails");
    }));
    assert!(rt.block_on(task).unwrap_err().is_panic());
    let spans = exporter.get_finished_spans().unwrap();
    let span = spans
        .iter()
        .find(|s| s.name == "process orders-panic")
        .expect("the span ends when the handler panics");
    assert!(
        span.attributes
            .contains(&KeyValue::new("error.type", "panic")),
        "{:?}",
        span.attributes
    );
}

/// Review finding: a handler given to `MessageContext::run` that panicked skipped the
/// recipe's `finish`, and the span was exported as a success when the context was dropped.
/// Now the drop ends it as a panic; a context dropped without `finish` otherwise ends it as
/// finished, and `finish` ends it once.
#[test]
fn a_panicking_sync_handler_span_is_marked() {
    let (provider, exporter) = telemetry();
    let consumer = Consumer::new()
        .with_tracer(provider.tracer("test-sync-panic"))
        .destination("orders-sync-panic");
    let panicked = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let message = consumer.context(&Pairs::default());
        message.run(|| panic!("the handler fails"));
        message.finish();
    }));
    assert!(panicked.is_err());
    let message = consumer.context(&Pairs::default());
    message.run(|| ());
    drop(message);
    let message = consumer.context(&Pairs::default());
    message.finish();
    let spans = exporter.get_finished_spans().unwrap();
    let ours: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "process orders-sync-panic")
        .collect();
    assert_eq!(ours.len(), 3, "{ours:?}");
    assert!(
        ours[0]
            .attributes
            .contains(&KeyValue::new("error.type", "panic")),
        "{:?}",
        ours[0].attributes
    );
    for span in &ours[1..] {
        assert!(
            !span
                .attributes
                .iter()
                .any(|kv| kv.key.as_str() == "error.type"),
            "{:?}",
            span.attributes
        );
    }
}

/// Whose poll panicked decides the label, not whether a panic is unwinding: a handler whose
/// panic was caught (the future dropped after unwinding ended) failed as a panic; a sibling
/// handler dropped while another one's panic unwinds through their task was cancelled.
#[test]
fn the_handler_that_panicked_is_marked_not_its_siblings() {
    let (provider, exporter) = telemetry();
    let consumer = |destination: &str| {
        Consumer::new()
            .with_tracer(provider.tracer("test-panic-sibling"))
            .destination(destination)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let caught = consumer("sib-caught").scope(&Pairs::default(), async {
        panic!("caught by the caller");
    });
    let result = rt.block_on(async {
        let mut caught = Box::pin(caught);
        let result = futures_catch(caught.as_mut()).await;
        drop(caught);
        result
    });
    assert!(result.is_err());
    let waits = consumer("sib-waits").scope(&Pairs::default(), async {
        std::future::pending::<()>().await
    });
    let fails = consumer("sib-fails").scope(&Pairs::default(), async {
        tokio::task::yield_now().await;
        panic!("the other handler fails");
    });
    let task = rt.spawn(async move { futures_util::join!(waits, fails) });
    assert!(rt.block_on(task).unwrap_err().is_panic());
    let label = |destination: &str| {
        let name = format!("process {destination}");
        exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .find(|s| s.name == name)
            .and_then(|s| {
                s.attributes
                    .iter()
                    .find(|kv| kv.key.as_str() == "error.type")
                    .map(|kv| kv.value.to_string())
            })
    };
    assert_eq!(label("sib-caught").as_deref(), Some("panic"));
    assert_eq!(label("sib-fails").as_deref(), Some("panic"));
    assert_eq!(label("sib-waits").as_deref(), Some("cancelled"));
}

proptest! {
    #[test]
    fn arbitrary_metadata_never_panics_and_gives_a_valid_request_id(
        pairs in proptest::collection::vec(
            (
                prop_oneof![
                    Just("traceparent".to_owned()),
                    Just("tracestate".to_owned()),
                    Just("baggage".to_owned()),
                    Just("x-request-id".to_owned()),
                    ".{0,12}",
                ],
                prop_oneof![".{0,80}", "[ -~]{0,300}", Just(PARENT.to_owned())],
            ),
            0..12,
        )
    ) {
        // The carried request id is used only when there is exactly one copy, and a repeated
        // one never is.
        let copies = crate::request_id_copies(&pairs);
        let metadata = Pairs::new(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let id: RequestId = Consumer::new()
            .without_spans()
            .run(&metadata, || contextflow_otel::current_request_id().unwrap());
        let id = id.as_str();
        prop_assert!(!id.is_empty() && id.len() <= 128);
        prop_assert!(id.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        // `PARENT` is a valid request id (visible ASCII, under 128 bytes).
        if copies == [PARENT] {
            prop_assert_eq!(id, PARENT, "the one carried x-request-id is used");
        } else if copies.len() > 1 {
            prop_assert!(!copies.contains(&id), "a repeated x-request-id is never used: {}", id);
        }
    }
}

/// Inside a message's context, a request id bound for one piece of its work (say, the order a
/// batch job handles) is the one a publish writes: the innermost binding wins over the id the
/// message's context carries.
#[test]
fn a_request_id_bound_inside_a_message_is_the_one_published() {
    let message = Consumer::new()
        .without_spans()
        .context(&Pairs::new([("x-request-id", "msg-1")]));
    let written = |ids: &mut Vec<String>| {
        contextflow_messaging::Publisher::new().inject(&mut contextflow_otel::carrier::InjectFn(
            |key: &str, value: String| {
                if key == "x-request-id" {
                    ids.push(value)
                }
            },
        ))
    };
    let mut ids = Vec::new();
    message.run(|| {
        written(&mut ids);
        let order: RequestId = "order-17".parse().unwrap();
        contextflow_otel::REQUEST_ID.sync_scope(order, || written(&mut ids));
    });
    message.finish();
    assert_eq!(ids, ["msg-1", "order-17"]);
}

/// Review finding: the handler's context is layered over the frame of whoever polls it, so the
/// loop's tenant reached every message, also one the trust check refused. `isolate` unsets it.
#[tokio::test(flavor = "current_thread")]
async fn an_isolated_variable_never_comes_from_the_loop() {
    let refuse = |_: &dyn Extractor| None;
    let accept = |_: &dyn Extractor| Some(Bindings::new().bind(&TENANT, "acme".to_owned()));
    let seen = |consumer: Consumer| {
        TENANT.scope("loop-tenant".to_owned(), async move {
            consumer
                .scope(&Pairs::default(), async { TENANT.get() })
                .await
        })
    };
    // As documented without `isolate`: the loop's binding stays visible.
    assert_eq!(
        seen(Consumer::new().trust(refuse)).await.as_deref(),
        Some("loop-tenant")
    );
    assert_eq!(
        seen(Consumer::new().isolate(&TENANT).trust(refuse)).await,
        None
    );
    assert_eq!(
        seen(Consumer::new().isolate(&TENANT).trust(accept))
            .await
            .as_deref(),
        Some("acme")
    );
}

/// Review findings: extraction read the loop's current OpenTelemetry context through a
/// propagator that reads the current context (OpenTelemetry's no-op); a consumer span that the
/// SDK returned invalid (its provider shut down) hid the producer's trace from the handler.
#[tokio::test(flavor = "current_thread")]
async fn the_loops_trace_never_reaches_a_message_and_a_dead_provider_keeps_the_producers() {
    use opentelemetry::trace::{SpanContext, TraceContextExt as _, TraceFlags, TraceState};
    let loop_cx = Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from(7u128),
        SpanId::from(7u64),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ));
    let noop =
        Consumer::new().with_propagator(opentelemetry::trace::noop::NoopTextMapPropagator::new());
    let seen = {
        let _loop = loop_cx.attach();
        noop.scope(&Pairs::default(), async {
            contextflow_otel::current_trace_id()
        })
        .await
    };
    assert_ne!(seen, Some(TraceId::from(7u128)));

    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(InMemorySpanExporter::default())
        .build();
    let consumer = Consumer::new().with_tracer(provider.tracer("late"));
    provider.shutdown().unwrap();
    let seen = consumer
        .scope(&Pairs::new([("traceparent", PARENT)]), async {
            contextflow_otel::current_trace_id().map(|id| id.to_string())
        })
        .await;
    assert_eq!(seen.as_deref(), Some(TRACE));
}
