//! The `trace-context-service` example, driven in-process the way a test harness drives it.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{extract::State, http::HeaderMap, routing::post, Json, Router};
use contextflow_otel::TraceParent;

#[allow(dead_code)] // `main` is the example's entry point, unused here.
#[path = "../../examples/trace-context-service.rs"]
mod service;

type Received = Arc<Mutex<Vec<(String, HeaderMap, serde_json::Value)>>>;

/// A harness stand-in: records every callback it gets.
async fn harness() -> (SocketAddr, Received) {
    let received: Received = Arc::default();
    let app = Router::new()
        .route(
            "/callback/{name}",
            post(
                |State(received): State<Received>,
                 axum::extract::Path(name): axum::extract::Path<String>,
                 headers: HeaderMap,
                 Json(body): Json<serde_json::Value>| async move {
                    received.lock().unwrap().push((name, headers, body));
                },
            ),
        )
        .with_state(received.clone());
    (serve(app).await, received)
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn drive_the_service() {
    let (harness_addr, received) = harness().await;
    let tracer = service::tracer();
    let service_addr = serve(service::app(service::client(tracer.clone()), tracer)).await;
    let cases = serde_json::json!([
        { "url": format!("http://{harness_addr}/callback/first"), "arguments": [1, 2] },
        { "url": format!("http://{harness_addr}/callback/second"), "arguments": [] },
    ]);
    let res = reqwest::Client::new()
        .post(format!("http://{service_addr}/test"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("tracestate", "foo=1, bar=2")
        .json(&cases)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let received = received.lock().unwrap().clone();
    let names: Vec<_> = received.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["first", "second"], "in order");
    assert_eq!(
        received[0].2,
        serde_json::json!([1, 2]),
        "arguments are the body"
    );
    let mut span_ids = Vec::new();
    for (name, headers, _) in &received {
        let tp: TraceParent = headers["traceparent"].to_str().unwrap().parse().unwrap();
        assert_eq!(
            tp.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "{name}"
        );
        assert!(tp.flags().is_sampled(), "{name}");
        assert_ne!(tp.parent_id().to_string(), "00f067aa0ba902b7", "{name}");
        assert_eq!(headers["tracestate"], "foo=1,bar=2", "{name}");
        span_ids.push(tp.parent_id());
    }
    assert_ne!(span_ids[0], span_ids[1]);

    // A malformed traceparent: the callbacks get a new trace and no tracestate.
    let (harness_addr, received) = harness().await;
    let cases = serde_json::json!([
        { "url": format!("http://{harness_addr}/callback/only"), "arguments": [] },
    ]);
    let res = reqwest::Client::new()
        .post(format!("http://{service_addr}/test"))
        .header(
            "traceparent",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        )
        .header("tracestate", "foo=1")
        .json(&cases)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let received = received.lock().unwrap().clone();
    let headers = &received[0].1;
    let tp: TraceParent = headers["traceparent"].to_str().unwrap().parse().unwrap();
    assert_ne!(
        tp.trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert!(!headers.contains_key("tracestate"));
}

#[tokio::test(flavor = "current_thread")]
async fn drives_the_service_current_thread() {
    drive_the_service().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drives_the_service_multi_thread() {
    drive_the_service().await;
}
