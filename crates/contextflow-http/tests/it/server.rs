//! The server layer: extraction, extensions, echo, and the context over the whole request.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use contextflow_http::{PropagateContextLayer, RequestId, REQUEST_ID};
use http::{Request, Response};
use http_body_util::BodyExt;
use opentelemetry::{
    baggage::BaggageExt as _,
    trace::{SpanContext, TraceContextExt as _},
    Context as OtelContext,
};
use tower::{service_fn, ServiceBuilder, ServiceExt};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// What the handler saw.
#[derive(Debug, Clone)]
struct Seen {
    /// OpenTelemetry's current span context.
    trace: SpanContext,
    /// The span context of contextflow's `OTEL_CONTEXT`.
    frame_trace: Option<SpanContext>,
    request_id: Option<RequestId>,
    baggage: Vec<(String, String)>,
    request_id_header: Option<String>,
    extension_id: Option<RequestId>,
}

fn current_baggage() -> Vec<(String, String)> {
    let cx = OtelContext::current();
    let mut all: Vec<_> = cx
        .baggage()
        .iter()
        .map(|(k, (v, _))| (k.to_string(), v.to_string()))
        .collect();
    all.sort();
    all
}

/// Sends `req` through the layer to a handler that records what it sees.
async fn call(req: Request<String>) -> (Response<String>, Seen) {
    let seen = Arc::new(Mutex::new(None));
    let seen2 = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(PropagateContextLayer::new())
        .service(service_fn(move |req: Request<String>| {
            let seen = seen2.clone();
            async move {
                tokio::task::yield_now().await;
                *seen.lock().unwrap() = Some(Seen {
                    trace: OtelContext::map_current(|cx| cx.span().span_context().clone()),
                    frame_trace: contextflow_otel::OTEL_CONTEXT
                        .with(|cx| cx.map(|cx| cx.context().span().span_context().clone())),
                    request_id: REQUEST_ID.get(),
                    baggage: current_baggage(),
                    request_id_header: req
                        .headers()
                        .get("x-request-id")
                        .map(|v| v.to_str().unwrap().to_owned()),
                    extension_id: req.extensions().get::<RequestId>().cloned(),
                });
                Ok::<_, Infallible>(Response::new(String::from("ok")))
            }
        }));
    let res = svc.oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let res = Response::from_parts(parts, String::from_utf8(body.to_vec()).unwrap());
    let seen = seen.lock().unwrap().clone().unwrap();
    (res, seen)
}

fn request() -> http::request::Builder {
    Request::builder().uri("/")
}

/// A baggage member with a byte that is not visible ASCII (raw UTF-8 instead of its percent
/// encoding) is invalid: that member is dropped, the others kept (W3C Baggage: an invalid
/// list-member is dropped, not the whole header).
#[tokio::test(flavor = "current_thread")]
async fn a_non_ascii_baggage_member_drops_only_itself() {
    let req = request()
        .header(
            "baggage",
            http::HeaderValue::from_bytes(b"env=prod,note=caf\xc3\xa9,region=eu").unwrap(),
        )
        .body(String::new())
        .unwrap();
    let (_, seen) = call(req).await;
    assert_eq!(
        seen.baggage,
        [
            ("env".into(), "prod".into()),
            ("region".into(), "eu".into())
        ]
    );
}

/// Review finding: extraction started from the thread's current OpenTelemetry context, so an
/// OpenTelemetry guard that another request's code left attached on a worker thread (held
/// across an `.await`) made that request's span the parent, and its baggage the baggage, of
/// every header-less request polled there. A server's request starts from its headers only.
#[test]
fn a_context_left_attached_on_the_thread_is_not_inherited() {
    use opentelemetry::{
        trace::{SpanId, TraceFlags, TraceId, TraceState},
        KeyValue,
    };
    std::thread::spawn(|| {
        let leftover = OtelContext::new()
            .with_remote_span_context(SpanContext::new(
                TraceId::from_hex(TRACE).unwrap(),
                SpanId::from_hex(PARENT).unwrap(),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            ))
            .with_baggage([KeyValue::new("user", "mallory")]);
        // Never detached on this thread, as a guard dropped out of order leaves it.
        std::mem::forget(leftover.attach());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (_, seen) = runtime.block_on(call(request().body(String::new()).unwrap()));
        assert!(!seen.trace.is_valid(), "{:?}", seen.trace);
        assert!(seen.baggage.is_empty(), "{:?}", seen.baggage);
    })
    .join()
    .unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn continues_the_callers_trace() {
    let req = request()
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .header("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        .header("baggage", "userId=alice,region=eu%20west")
        .header("x-request-id", "req-1")
        .body(String::new())
        .unwrap();
    let (res, seen) = call(req).await;
    // No SDK installed: the server span is a no-op, so the caller's span passes through.
    let trace = seen.trace;
    assert_eq!(trace.trace_id().to_string(), TRACE);
    assert_eq!(trace.span_id().to_string(), PARENT);
    assert!(trace.is_remote());
    assert!(trace.is_sampled());
    assert_eq!(
        trace.trace_state().header(),
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    );
    assert_eq!(seen.frame_trace.as_ref(), Some(&trace), "the frame agrees");
    assert_eq!(seen.request_id.unwrap().as_str(), "req-1");
    assert!(seen.baggage.contains(&("region".into(), "eu west".into())));
    assert_eq!(res.headers()["x-request-id"], "req-1", "echoed");
    assert_eq!(res.body(), "ok");
    assert_eq!(seen.extension_id.unwrap().as_str(), "req-1");
    assert_eq!(seen.request_id_header.as_deref(), Some("req-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn makes_a_request_id_and_no_trace_when_none_came() {
    let (res, seen) = call(request().body(String::new()).unwrap()).await;
    assert!(
        !seen.trace.is_valid(),
        "no SDK and no caller: no trace id is made up"
    );
    let id = seen.request_id.unwrap();
    assert_eq!(id.as_str().len(), 36);
    assert_eq!(res.headers()["x-request-id"], id.as_str());
    assert_eq!(
        seen.request_id_header.as_deref(),
        Some(id.as_str()),
        "set on the request too"
    );
    assert!(seen.baggage.is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn invalid_traceparent_is_dropped_with_its_tracestate() {
    let bad = [
        format!("00-{}-{PARENT}-01", TRACE.to_uppercase()),
        format!("ff-{TRACE}-{PARENT}-01"),
        format!("00-{TRACE}-{PARENT}-01-extra"),
        "caf\u{e9}\tnot-a-traceparent".to_string(),
    ];
    for value in bad {
        let req = request()
            .header("traceparent", value.as_bytes())
            .header("tracestate", "congo=t61rcWkgMzE")
            .body(String::new())
            .unwrap();
        let trace = call(req).await.1.trace;
        assert!(!trace.is_valid(), "{value:?}");
        assert_eq!(
            trace.trace_state().header(),
            "",
            "{value:?}: tracestate dropped"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn duplicate_traceparent_headers_are_dropped() {
    let tp = format!("00-{TRACE}-{PARENT}-01");
    let req = request()
        .header("traceparent", &tp)
        .header("traceparent", &tp)
        .body(String::new())
        .unwrap();
    let trace = call(req).await.1.trace;
    assert!(!trace.is_valid());
}

#[tokio::test(flavor = "current_thread")]
async fn invalid_tracestate_alone_is_dropped() {
    let req = request()
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .header("tracestate", "a=1,Bad=2")
        .body(String::new())
        .unwrap();
    let trace = call(req).await.1.trace;
    assert_eq!(trace.trace_id().to_string(), TRACE, "the trace continues");
    assert_eq!(trace.trace_state().header(), "");
}

#[tokio::test(flavor = "current_thread")]
async fn invalid_request_id_is_replaced() {
    let long = "x".repeat(129);
    for bad in ["two words", long.as_str(), "caf\u{e9}"] {
        let req = request()
            .header("x-request-id", bad.as_bytes())
            .body(String::new())
            .unwrap();
        let (res, seen) = call(req).await;
        let id = seen.request_id.unwrap();
        assert_ne!(id.as_str(), bad);
        assert_eq!(res.headers()["x-request-id"], id.as_str());
        assert_eq!(
            seen.request_id_header.as_deref(),
            Some(id.as_str()),
            "{bad:?} replaced on the request"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn handler_request_id_on_the_response_is_kept() {
    let svc = ServiceBuilder::new()
        .layer(PropagateContextLayer::new())
        .service(service_fn(|_req: Request<String>| async {
            let res = Response::builder()
                .header("x-request-id", "chosen-by-handler")
                .body(String::new())
                .unwrap();
            Ok::<_, Infallible>(res)
        }));
    let req = request()
        .header("x-request-id", "incoming")
        .body(String::new())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let ids: Vec<_> = res.headers().get_all("x-request-id").iter().collect();
    assert_eq!(ids, ["chosen-by-handler"]);
}

#[tokio::test(flavor = "current_thread")]
async fn an_earlier_layer_already_set_the_request_id() {
    let earlier: RequestId = "from-outer-layer".parse().unwrap();
    let seen = Arc::new(Mutex::new(None));
    let seen2 = seen.clone();
    let svc = ServiceBuilder::new()
        .map_request({
            let earlier = earlier.clone();
            move |mut req: Request<String>| {
                req.extensions_mut().insert(earlier.clone());
                req
            }
        })
        .layer(PropagateContextLayer::new())
        .service(service_fn(move |req: Request<String>| {
            *seen2.lock().unwrap() = Some((
                REQUEST_ID.get(),
                contextflow_http::current_trace_id(),
                req.headers()["x-request-id"].clone(),
            ));
            async { Ok::<_, Infallible>(Response::new(String::new())) }
        }));
    let req = request()
        .header("x-request-id", "from-header")
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .body(String::new())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let (id, ctx, header) = seen.lock().unwrap().take().unwrap();
    assert_eq!(id, Some(earlier.clone()));
    assert_eq!(ctx.map(|id| id.to_string()).as_deref(), Some(TRACE));
    assert_eq!(header, "from-outer-layer");
    assert_eq!(res.headers()["x-request-id"], "from-outer-layer");
}

/// A repeated `x-request-id` whose first copy is the id an earlier layer chose: the inner
/// service still sees that one value only, never the client's second one.
#[tokio::test(flavor = "current_thread")]
async fn a_repeated_request_id_header_reaches_the_handler_once() {
    let earlier: RequestId = "first".parse().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let svc = ServiceBuilder::new()
        .map_request({
            let earlier = earlier.clone();
            move |mut req: Request<String>| {
                req.extensions_mut().insert(earlier.clone());
                req
            }
        })
        .layer(PropagateContextLayer::new())
        .service(service_fn(move |req: Request<String>| {
            *seen2.lock().unwrap() = req
                .headers()
                .get_all("x-request-id")
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            async { Ok::<_, Infallible>(Response::new(String::new())) }
        }));
    let req = request()
        .header("x-request-id", "first")
        .header("x-request-id", "smuggled")
        .body(String::new())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), ["first"]);
    let echoed: Vec<_> = res.headers().get_all("x-request-id").iter().collect();
    assert_eq!(echoed, ["first"]);
}

/// Records the request id seen by each poll and by the drop of a body.
struct ProbeBody {
    chunks: Vec<&'static str>,
    log: Arc<Mutex<Vec<String>>>,
}

impl http_body::Body for ProbeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let id = REQUEST_ID.get().map_or("-".into(), |id| id.to_string());
        self.log.lock().unwrap().push(format!("poll:{id}"));
        Poll::Ready(
            self.chunks
                .pop()
                .map(|c| Ok(http_body::Frame::data(Bytes::from_static(c.as_bytes())))),
        )
    }
}

impl Drop for ProbeBody {
    fn drop(&mut self) {
        let id = REQUEST_ID.get().map_or("-".into(), |id| id.to_string());
        self.log.lock().unwrap().push(format!("drop:{id}"));
    }
}

async fn body_streams_in_context() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    let svc = ServiceBuilder::new()
        .layer(PropagateContextLayer::new())
        .service(service_fn(move |_req: Request<String>| {
            let log = log2.clone();
            async move {
                Ok::<_, Infallible>(Response::new(ProbeBody {
                    chunks: vec!["b", "a"],
                    log,
                }))
            }
        }));
    let req = request()
        .header("x-request-id", "streamed")
        .body(String::new())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    // Read the body from another task, outside any scope.
    let body = tokio::spawn(async move { res.into_body().collect().await.unwrap().to_bytes() })
        .await
        .unwrap();
    assert_eq!(&body[..], b"ab");
    assert!(!REQUEST_ID.is_set());
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        [
            "poll:streamed",
            "poll:streamed",
            "poll:streamed",
            "drop:streamed"
        ]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn body_streams_in_context_current_thread() {
    body_streams_in_context().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_streams_in_context_multi_thread() {
    body_streams_in_context().await;
}

/// Drops a handler half-way (a client going away): its destructors see the context.
async fn cancelled_handler_drops_in_context() {
    struct OnDrop(Arc<Mutex<Option<Option<RequestId>>>>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = Some(REQUEST_ID.get());
        }
    }
    let dropped = Arc::new(Mutex::new(None));
    let dropped2 = dropped.clone();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let started_tx = Arc::new(Mutex::new(Some(started_tx)));
    let svc = ServiceBuilder::new()
        .layer(PropagateContextLayer::new())
        .service(service_fn(move |_req: Request<String>| {
            let guard = OnDrop(dropped2.clone());
            let started = started_tx.lock().unwrap().take();
            async move {
                let _guard = guard;
                if let Some(tx) = started {
                    let _ = tx.send(());
                }
                std::future::pending::<()>().await;
                Ok::<_, Infallible>(Response::new(String::new()))
            }
        }));
    let req = request()
        .header("x-request-id", "gone")
        .body(String::new())
        .unwrap();
    let task = tokio::spawn(svc.oneshot(req));
    started_rx.await.unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    let seen = dropped.lock().unwrap().take().unwrap();
    assert_eq!(seen.map(|id| id.to_string()).as_deref(), Some("gone"));
}

#[tokio::test(flavor = "current_thread")]
async fn cancelled_handler_drops_in_context_current_thread() {
    cancelled_handler_drops_in_context().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_handler_drops_in_context_multi_thread() {
    cancelled_handler_drops_in_context().await;
}

#[tokio::test(flavor = "current_thread")]
async fn poll_ready_is_delegated() {
    let (mut svc, mut handle) =
        tower_test::mock::spawn_layer::<Request<()>, Response<()>, _>(PropagateContextLayer::new());
    handle.allow(0);
    assert!(svc.poll_ready().is_pending());
    handle.allow(1);
    assert!(matches!(svc.poll_ready(), Poll::Ready(Ok(()))));
    let fut = svc.call(Request::new(()));
    let (req, send) = handle.next_request().await.unwrap();
    assert!(req.headers().contains_key("x-request-id"));
    send.send_response(Response::new(()));
    let res = fut.await.unwrap();
    assert!(res.headers().contains_key("x-request-id"));
}

#[tokio::test(flavor = "current_thread")]
async fn axum_extractors_see_the_extensions() {
    use axum::{routing::get, Extension, Router};

    let app = Router::new()
        .route(
            "/",
            get(|Extension(id): Extension<RequestId>| async move {
                let trace = contextflow_http::current_trace_id().unwrap();
                format!("{id} {trace}")
            }),
        )
        .layer(PropagateContextLayer::new());
    let req = request()
        .header("x-request-id", "axum-1")
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .body(axum::body::Body::empty())
        .unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.headers()["x-request-id"], "axum-1");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, format!("axum-1 {TRACE}"));
}

#[test]
fn futures_and_bodies_are_send_when_their_parts_are() {
    fn assert_send_sync<T: Send + Sync>(_: &T) {}
    fn assert_send<T: Send>(_: &T) {}
    let mut svc = ServiceBuilder::new()
        .layer(PropagateContextLayer::new())
        .service(service_fn(|_req: Request<String>| async {
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
    assert_send_sync(&svc);
    let fut = tower::Service::call(&mut svc, Request::new(String::new()));
    assert_send(&fut);
    let body = contextflow_http::ContextBody::new(String::new(), contextflow::Snapshot::empty());
    assert_send_sync(&body);
}

/// The application's own variable, bound by authenticated code inside the layer.
static TENANT: contextflow::AsyncLocal<String> = contextflow::AsyncLocal::named("tenant");

async fn tenant_from_an_inner_layer() {
    use axum::{extract::Request as AxumRequest, middleware::Next, routing::get, Router};

    async fn authenticate(req: AxumRequest, next: Next) -> axum::response::Response {
        // Stand-in for a verified token.
        let tenant = req.headers()["x-verified-tenant"]
            .to_str()
            .unwrap()
            .to_owned();
        TENANT.scope(tenant, next.run(req)).await
    }

    let app = Router::new()
        .route(
            "/",
            get(|| async {
                // A spawned task sees both the request's context and the tenant.
                contextflow::spawn(async {
                    format!("{} {}", REQUEST_ID.get().unwrap(), TENANT.get().unwrap())
                })
                .await
                .unwrap()
            }),
        )
        .layer(axum::middleware::from_fn(authenticate))
        .layer(PropagateContextLayer::new());
    let req = request()
        .header("x-request-id", "r-9")
        .header("x-verified-tenant", "acme")
        .body(axum::body::Body::empty())
        .unwrap();
    let res = app.oneshot(req).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "r-9 acme");
    assert!(!TENANT.is_set());
}

#[tokio::test(flavor = "current_thread")]
async fn tenant_from_an_inner_layer_current_thread() {
    tenant_from_an_inner_layer().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_from_an_inner_layer_multi_thread() {
    tenant_from_an_inner_layer().await;
}

#[tokio::test(flavor = "current_thread")]
async fn inner_errors_pass_through_and_see_the_context() {
    let svc = ServiceBuilder::new()
        .layer(PropagateContextLayer::new())
        .service(service_fn(|_req: Request<String>| async {
            Err::<Response<String>, String>(format!("failed in {}", REQUEST_ID.get().unwrap()))
        }));
    let req = request()
        .header("x-request-id", "err-1")
        .body(String::new())
        .unwrap();
    assert_eq!(svc.oneshot(req).await.unwrap_err(), "failed in err-1");
}

/// A client that goes away in the middle of a streamed body: the body is dropped inside the
/// request's context, and the thread's context is clean afterwards.
async fn body_dropped_mid_stream() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    let svc = ServiceBuilder::new()
        .layer(PropagateContextLayer::new())
        .service(service_fn(move |_req: Request<String>| {
            let log = log2.clone();
            async move {
                Ok::<_, Infallible>(Response::new(ProbeBody {
                    chunks: vec!["c", "b", "a"],
                    log,
                }))
            }
        }));
    let req = request()
        .header("x-request-id", "half-read")
        .body(String::new())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let mut body = res.into_body();
    // Read one frame, then drop the body (the connection closed).
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "a");
    drop(body);
    assert!(!REQUEST_ID.is_set());
    assert!(!OtelContext::current().has_active_span());
    let log = log.lock().unwrap().clone();
    assert_eq!(log, ["poll:half-read", "drop:half-read"]);
}

#[tokio::test(flavor = "current_thread")]
async fn body_dropped_mid_stream_current_thread() {
    body_dropped_mid_stream().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_dropped_mid_stream_multi_thread() {
    body_dropped_mid_stream().await;
}

/// A handler that panics: the panic propagates (the task fails), the context is restored,
/// and the next request on the same thread sees only its own context.
async fn handler_panic_restores_the_context() {
    let svc = ServiceBuilder::new()
        .layer(PropagateContextLayer::new())
        .service(service_fn(|req: Request<String>| async move {
            if req.headers()["x-request-id"] == "boom" {
                panic!("handler failed");
            }
            Ok::<_, Infallible>(Response::new(
                REQUEST_ID
                    .get()
                    .map(|id| id.to_string())
                    .unwrap_or_default(),
            ))
        }));
    let boom = request()
        .header("x-request-id", "boom")
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .body(String::new())
        .unwrap();
    let failed = tokio::spawn(svc.clone().oneshot(boom)).await;
    assert!(
        failed.unwrap_err().is_panic(),
        "the handler's panic reached the task"
    );
    // Inline too, caught here: nothing of the request stays current.
    let caught = std::panic::AssertUnwindSafe(
        svc.clone().oneshot(
            request()
                .header("x-request-id", "boom")
                .body(String::new())
                .unwrap(),
        ),
    );
    let caught = futures_catch(caught).await;
    assert!(caught.is_err());
    assert!(!REQUEST_ID.is_set());
    assert!(!contextflow_otel::OTEL_CONTEXT.is_set());
    assert!(!OtelContext::current().has_active_span());
    let ok = request()
        .header("x-request-id", "fine")
        .body(String::new())
        .unwrap();
    let res = svc.oneshot(ok).await.unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "fine");
}

/// Polls `fut`, catching a panic of any poll.
async fn futures_catch<F: std::future::Future>(
    fut: std::panic::AssertUnwindSafe<F>,
) -> std::thread::Result<F::Output> {
    let mut fut = Box::pin(fut.0);
    std::future::poll_fn(move |cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(e) => Poll::Ready(Err(e)),
        }
    })
    .await
}

#[tokio::test(flavor = "current_thread")]
async fn handler_panic_restores_the_context_current_thread() {
    handler_panic_restores_the_context().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_panic_restores_the_context_multi_thread() {
    handler_panic_restores_the_context().await;
}
