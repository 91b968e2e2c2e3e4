//! End to end on loopback: a client calls service A, which calls service B through the client
//! middleware. One trace id, the baggage and the request id kept. No SDK is installed in this
//! binary, so no span id is made: each hop passes the caller's span on (tests/spans.rs checks
//! real spans).

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{Path, State},
    routing::get,
    Json, Router,
};
use contextflow_http::{InjectContextMiddleware, PropagateContextLayer};
use opentelemetry::trace::TraceContextExt as _;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use serde::{Deserialize, Serialize};

/// What one service saw in its context.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Seen {
    trace_id: String,
    span_id: String,
    request_id: String,
    baggage: String,
}

impl Seen {
    fn current() -> Seen {
        let cx = contextflow_otel::current_context();
        let span = cx.span();
        let sc = span.span_context();
        Seen {
            trace_id: sc.trace_id().to_string(),
            span_id: sc.span_id().to_string(),
            request_id: contextflow_http::current_request_id().unwrap().to_string(),
            baggage: contextflow_otel::Baggage::from_otel(
                opentelemetry::baggage::BaggageExt::baggage(&cx),
            )
            .to_string(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Hops {
    a: Seen,
    b: Seen,
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Starts B, then A (which calls B); returns A's address.
async fn start_services() -> SocketAddr {
    let b = Router::new()
        .route(
            "/b",
            get(|| async {
                tokio::task::yield_now().await;
                Json(Seen::current())
            }),
        )
        .layer(PropagateContextLayer::new());
    let b_addr = serve(b).await;

    let client = ClientBuilder::new(reqwest::Client::new())
        .with(InjectContextMiddleware::new())
        .build();
    let a = Router::new()
        .route(
            "/a/{spawn}",
            get(
                move |State(client): State<ClientWithMiddleware>,
                      Path(spawn): Path<bool>| async move {
                    let a = Seen::current();
                    let call = async move {
                        let res = client
                            .get(format!("http://{b_addr}/b"))
                            .send()
                            .await
                            .unwrap();
                        res.json::<Seen>().await.unwrap()
                    };
                    let b = if spawn {
                        // A spawned task inherits the request's context, and injects it.
                        contextflow::spawn(call).await.unwrap()
                    } else {
                        call.await
                    };
                    Json(Hops { a, b })
                },
            ),
        )
        .with_state(client)
        .layer(PropagateContextLayer::new());
    serve(a).await
}

async fn call_a(
    http: &reqwest::Client,
    a_addr: SocketAddr,
    trace_id: &str,
    request_id: &str,
    baggage: &str,
    spawn: bool,
) -> Hops {
    http.get(format!("http://{a_addr}/a/{spawn}"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .header("x-request-id", request_id)
        .header("baggage", baggage)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn check(hops: &Hops, trace_id: &str, request_id: &str, baggage: &str) {
    for seen in [&hops.a, &hops.b] {
        assert_eq!(seen.trace_id, trace_id, "one trace id");
        assert_eq!(seen.request_id, request_id, "request id kept");
        let mut want: Vec<&str> = baggage.split(',').collect();
        let mut got: Vec<&str> = seen.baggage.split(',').collect();
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, want, "baggage kept");
        assert_eq!(seen.span_id, "00f067aa0ba902b7", "no span made up");
    }
}

async fn one_request_through_two_services() {
    let a_addr = start_services().await;
    let http = reqwest::Client::new();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    for spawn in [false, true] {
        let hops = call_a(
            &http,
            a_addr,
            trace_id,
            "req-1",
            "userId=alice,region=eu",
            spawn,
        )
        .await;
        check(&hops, trace_id, "req-1", "userId=alice,region=eu");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn one_request_through_two_services_current_thread() {
    one_request_through_two_services().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_through_two_services_multi_thread() {
    one_request_through_two_services().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_requests_never_mix_contexts() {
    const REQUESTS: usize = 1000;
    const IN_FLIGHT: usize = 64;
    let a_addr = start_services().await;
    let http = reqwest::Client::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        let http = http.clone();
        let permits = permits.clone();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let trace_id = format!("{:032x}", 0x1000 + i);
            let request_id = format!("req-{i}");
            let baggage = format!("n={i},user=u{i}");
            let hops = call_a(&http, a_addr, &trace_id, &request_id, &baggage, i % 2 == 1).await;
            check(&hops, &trace_id, &request_id, &baggage);
            hops.b.request_id
        });
    }
    let mut ids = std::collections::HashSet::new();
    while let Some(id) = tasks.join_next().await {
        ids.insert(id.unwrap());
    }
    assert_eq!(ids.len(), REQUESTS, "every request kept its own id");
}

/// A client whose middleware sends baggage to 127.0.0.1 only, with its redirect policy.
fn client_with_redirect_policy() -> ClientWithMiddleware {
    let middleware =
        InjectContextMiddleware::new().baggage_only_to(|uri| uri.host() == Some("127.0.0.1"));
    let http = reqwest::Client::builder()
        .redirect(middleware.redirect_policy())
        .build()
        .unwrap();
    ClientBuilder::new(http).with(middleware).build()
}

/// Review finding: reqwest follows redirects below the middleware, with the first request's
/// headers: a `302` from an allowed host to another one carried the baggage there. With
/// `redirect_policy`, a redirect the filter refuses is not followed (the caller gets the
/// `302`); one it accepts is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_policy_keeps_baggage_inside_the_filter() {
    use axum::response::Redirect;
    use contextflow_otel::carrier::Pairs;
    // Echoes the baggage it got ("-" for none), and counts its calls.
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let echo = Router::new().route(
        "/echo",
        get(move |headers: http::HeaderMap| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                headers
                    .get("baggage")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned()
            }
        }),
    );
    let echo_port = serve(echo).await.port();
    let redirects = Router::new()
        .route(
            "/away",
            get(move || async move { Redirect::to(&format!("http://localhost:{echo_port}/echo")) }),
        )
        .route(
            "/near",
            get(move || async move { Redirect::to(&format!("http://127.0.0.1:{echo_port}/echo")) }),
        );
    let from = serve(redirects).await;
    let client = client_with_redirect_policy();
    let incoming = contextflow_otel::extract(&Pairs::new([("baggage", "userId=alice")]));
    let (away, near, outside) = contextflow_otel::scope(incoming, async {
        let away = client
            .get(format!("http://{from}/away"))
            .send()
            .await
            .unwrap();
        let near = client
            .get(format!("http://{from}/near"))
            .send()
            .await
            .unwrap();
        // A first request the filter refuses carries no baggage: its redirects are followed.
        let outside = client
            .get(format!("http://localhost:{}/away", from.port()))
            .send()
            .await
            .unwrap();
        (
            away.status(),
            near.text().await.unwrap(),
            outside.text().await.unwrap(),
        )
    })
    .await;
    assert_eq!(away, http::StatusCode::SEE_OTHER, "not followed");
    assert_eq!(near, "userId=alice", "followed, inside the filter");
    assert_eq!(outside, "-", "followed, with no baggage");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// `redirect_policy` follows as many redirects as reqwest's default policy (10), then fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_policy_stops_a_loop_as_reqwest_does() {
    use axum::response::Redirect;
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    let looping = Router::new().route(
        "/loop/{n}",
        get(move |Path(n): Path<u32>| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Redirect::to(&format!("/loop/{}", n + 1)) }
        }),
    );
    let addr = serve(looping).await;
    let client = client_with_redirect_policy();
    let err = client
        .get(format!("http://{addr}/loop/0"))
        .send()
        .await
        .expect_err("a redirect loop fails");
    assert!(err.is_redirect(), "{err}");
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        11,
        "the first request and 10 redirects"
    );
}
