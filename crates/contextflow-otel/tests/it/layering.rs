//! `contextflow_otel::scope` adds its bindings over the frame of whoever polls it: a variable
//! bound around its future (an outer middleware's `X.scope(v, fut)`) stays visible inside,
//! also while the inner future is dropped (issue 8, "request entry points replace the
//! poller's frame").

use contextflow::AsyncLocal;
use contextflow_otel::{carrier::Pairs, REQUEST_ID};
use opentelemetry::{
    trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState},
    Context,
};

static OUTER: AsyncLocal<u32> = AsyncLocal::named("outer");

fn incoming() -> Context {
    contextflow_otel::extract(&Pairs::new([
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("x-request-id", "req-otel"),
    ]))
}

type Seen = (Option<u32>, Option<String>, Option<TraceId>);

fn seen() -> Seen {
    (
        OUTER.get(),
        REQUEST_ID.get().map(|id| id.to_string()),
        contextflow_otel::current_trace_id(),
    )
}

async fn outer_binding_is_visible() {
    // Made outside the outer binding, bound around it afterwards: the usual middleware shape.
    let fut = contextflow_otel::scope(incoming(), async {
        tokio::task::yield_now().await;
        seen()
    });
    let (outer, id, trace) = OUTER.scope(7, fut).await;
    assert_eq!(outer, Some(7), "the outer binding stays visible");
    assert_eq!(
        id.as_deref(),
        Some("req-otel"),
        "and the context's request id"
    );
    assert_eq!(
        trace.map(|t| t.to_string()).as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(seen(), (None, None, None), "nothing left behind");
}

#[tokio::test(flavor = "current_thread")]
async fn outer_binding_is_visible_current_thread() {
    outer_binding_is_visible().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outer_binding_is_visible_multi_thread() {
    tokio::spawn(outer_binding_is_visible()).await.unwrap();
}

/// Records what its destructor sees.
struct OnDrop(std::sync::Arc<std::sync::Mutex<Option<Seen>>>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        *self.0.lock().unwrap() = Some(seen());
    }
}

async fn dropped_inside_the_layered_frame() {
    let record = std::sync::Arc::new(std::sync::Mutex::new(None));
    let guard = OnDrop(record.clone());
    let fut = contextflow_otel::scope(incoming(), async move {
        let _guard = guard;
        std::future::pending::<()>().await;
    });
    // Cancelled after one poll, inside the outer binding (a client disconnect).
    let mut outer = Box::pin(OUTER.scope(7, fut));
    assert!(futures_poll_once(outer.as_mut()).await.is_pending());
    drop(outer);
    let (outer, id, trace) = record.lock().unwrap().take().expect("dropped");
    assert_eq!(outer, Some(7));
    assert_eq!(id.as_deref(), Some("req-otel"));
    assert!(
        trace.is_some(),
        "the OpenTelemetry context is attached on drop too"
    );
}

async fn futures_poll_once<F: std::future::Future + Unpin>(
    mut fut: F,
) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut fut).poll(cx))).await
}

#[tokio::test(flavor = "current_thread")]
async fn dropped_inside_the_layered_frame_current_thread() {
    dropped_inside_the_layered_frame().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_inside_the_layered_frame_multi_thread() {
    tokio::spawn(dropped_inside_the_layered_frame())
        .await
        .unwrap();
}

#[test]
fn the_request_context_wins_over_the_pollers() {
    // An OpenTelemetry context attached by the poller is replaced, not merged.
    let poller = SpanContext::new(
        TraceId::from(1u128),
        SpanId::from(1u64),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let _attached = Context::new().with_remote_span_context(poller).attach();
    let fut = contextflow_otel::scope(incoming(), async { seen() });
    let (_, id, trace) = futures_executor(fut);
    assert_eq!(id.as_deref(), Some("req-otel"));
    assert_eq!(
        trace.map(|t| t.to_string()).as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
}

fn futures_executor<F: std::future::Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(fut)
}

/// Review finding: `current_context` fell back to the request's context when the current one
/// had no span, and dropped a suppression of telemetry made inside the request (the SDK's own
/// export work): a client span parented on it was recorded again.
fn suppression_is_kept() {
    let request = contextflow_otel::extract(&Pairs::new([("x-request-id", "req-quiet")]));
    contextflow_otel::sync_scope(request, || {
        assert!(!contextflow_otel::current_context().is_telemetry_suppressed());
        let _quiet = Context::enter_telemetry_suppressed_scope();
        let cx = contextflow_otel::current_context();
        assert!(cx.is_telemetry_suppressed());
        assert_eq!(
            cx.get::<contextflow_otel::RequestId>()
                .map(|id| id.as_str()),
            Some("req-quiet"),
            "still the request's context"
        );
    });
}

#[test]
fn a_suppression_of_telemetry_is_kept_by_current_context() {
    suppression_is_kept();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suppression_of_telemetry_is_kept_by_current_context_multi_thread() {
    let request = contextflow_otel::extract(&Pairs::new([("x-request-id", "req-quiet")]));
    contextflow_otel::scope(request, async {
        tokio::task::yield_now().await;
        tokio::task::spawn_blocking(suppression_is_kept)
            .await
            .unwrap();
        let quiet = {
            let _quiet = Context::enter_telemetry_suppressed_scope();
            contextflow_otel::current_context().is_telemetry_suppressed()
        };
        assert!(quiet);
        assert!(!contextflow_otel::current_context().is_telemetry_suppressed());
    })
    .await;
}
