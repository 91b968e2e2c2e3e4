//! The client layer: what goes out, from the request's task and from spawned tasks.

use std::convert::Infallible;

use contextflow::FutureExt as _;
use contextflow_http::{
    Baggage, IncomingContext, InjectContextLayer, RequestId, TraceContext, TraceParent, TraceState,
};
use http::{HeaderMap, Request};
use tower::{service_fn, ServiceBuilder, ServiceExt};

/// Sends a request through the client layer and returns the headers that went out.
async fn send(req: Request<()>) -> HeaderMap {
    ServiceBuilder::new()
        .layer(InjectContextLayer::new())
        .service(service_fn(|req: Request<()>| async move {
            Ok::<_, Infallible>(req.headers().clone())
        }))
        .oneshot(req)
        .await
        .unwrap()
}

fn incoming() -> IncomingContext {
    let parent: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03"
        .parse()
        .unwrap();
    let state: TraceState = "congo=t61rcWkgMzE".parse().unwrap();
    IncomingContext::new(
        TraceContext::child_of(&parent, state),
        "req-7".parse::<RequestId>().unwrap(),
        Baggage::parse("userId=alice,note=a%20b"),
    )
}

fn outgoing_traceparent(headers: &HeaderMap) -> TraceParent {
    headers["traceparent"].to_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn injects_the_current_context_with_a_new_span_per_request() {
    let ctx = incoming();
    let expected = ctx.trace_context().clone();
    let (a, b) = ctx
        .scope(async {
            let a = send(Request::new(())).await;
            let b = send(Request::new(())).await;
            (a, b)
        })
        .await;
    let (tp_a, tp_b) = (outgoing_traceparent(&a), outgoing_traceparent(&b));
    assert_eq!(tp_a.trace_id(), expected.trace_id());
    assert_eq!(tp_b.trace_id(), expected.trace_id());
    assert_ne!(
        tp_a.parent_id(),
        expected.span_id(),
        "a new span id, not the server's"
    );
    assert_ne!(
        tp_a.parent_id(),
        tp_b.parent_id(),
        "a new span id per request"
    );
    assert_eq!(tp_a.flags().bits(), 0x03, "flags preserved");
    assert_eq!(a["tracestate"], "congo=t61rcWkgMzE");
    assert_eq!(a["baggage"], "userId=alice,note=a%20b");
    assert_eq!(a["x-request-id"], "req-7");
}

#[tokio::test(flavor = "current_thread")]
async fn headers_set_by_the_caller_are_kept() {
    let mine = "00-11111111111111111111111111111111-2222222222222222-00";
    let req = Request::builder()
        .header("traceparent", mine)
        .header("baggage", "mine=1")
        .header("x-request-id", "my-id")
        .body(())
        .unwrap();
    let headers = incoming().scope(send(req)).await;
    assert_eq!(headers["traceparent"], mine);
    assert!(
        !headers.contains_key("tracestate"),
        "no tracestate added to a traceparent the caller chose"
    );
    assert_eq!(headers["baggage"], "mine=1");
    assert_eq!(headers["x-request-id"], "my-id");
}

#[tokio::test(flavor = "current_thread")]
async fn nothing_is_injected_outside_a_context() {
    let headers = send(Request::new(())).await;
    for name in ["traceparent", "tracestate", "baggage", "x-request-id"] {
        assert!(!headers.contains_key(name), "{name}");
    }
}

async fn spawned_tasks_inject_the_parent_context() {
    let ctx = incoming();
    let trace_id = ctx.trace_context().trace_id();
    let handles = ctx
        .scope(async {
            (0..8)
                .map(|_| contextflow::spawn(send(Request::new(()))))
                .collect::<Vec<_>>()
        })
        .await;
    for handle in handles {
        let headers = handle.await.unwrap();
        assert_eq!(outgoing_traceparent(&headers).trace_id(), trace_id);
        assert_eq!(headers["x-request-id"], "req-7");
        assert_eq!(headers["baggage"], "userId=alice,note=a%20b");
    }
    // A plain tokio::spawn does not inherit; `in_current_context` carries it over.
    let plain = incoming()
        .scope(async { tokio::spawn(send(Request::new(()))).await })
        .await;
    assert!(!plain.unwrap().contains_key("x-request-id"));
    let carried = incoming()
        .scope(async { tokio::spawn(send(Request::new(())).in_current_context()).await })
        .await;
    assert_eq!(carried.unwrap()["x-request-id"], "req-7");
}

#[tokio::test(flavor = "current_thread")]
async fn spawned_tasks_inject_the_parent_context_current_thread() {
    spawned_tasks_inject_the_parent_context().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_tasks_inject_the_parent_context_multi_thread() {
    spawned_tasks_inject_the_parent_context().await;
}

#[tokio::test(flavor = "current_thread")]
async fn poll_ready_is_delegated() {
    let (mut svc, mut handle) =
        tower_test::mock::spawn_layer::<Request<()>, (), _>(InjectContextLayer::new());
    handle.allow(0);
    assert!(svc.poll_ready().is_pending());
    handle.allow(1);
    assert!(matches!(svc.poll_ready(), std::task::Poll::Ready(Ok(()))));
    let fut = incoming()
        .into_snapshot()
        .run(|| svc.call(Request::new(())));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()["x-request-id"], "req-7");
    send.send_response(());
    fut.await.unwrap();
}
