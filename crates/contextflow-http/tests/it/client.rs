//! The client layer: what goes out, from the request's task and from spawned tasks.

use std::convert::Infallible;

use contextflow::FutureExt as _;
use contextflow_http::InjectContextLayer;
use contextflow_otel::{carrier::Pairs, TraceParent};
use http::{HeaderMap, HeaderValue, Request, Response};
use opentelemetry::Context as OtelContext;
use tower::{service_fn, ServiceBuilder, ServiceExt};

/// Sends a request through the client layer and returns the headers that went out.
async fn send(req: Request<()>) -> HeaderMap {
    ServiceBuilder::new()
        .layer(InjectContextLayer::new())
        .service(service_fn(|req: Request<()>| async move {
            Ok::<_, Infallible>(Response::new(req.headers().clone()))
        }))
        .oneshot(req)
        .await
        .unwrap()
        .into_body()
}

/// The context a server extracted from its caller.
fn incoming() -> OtelContext {
    contextflow_otel::extract(&Pairs::new([
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03",
        ),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("x-request-id", "req-7"),
        ("baggage", "userId=alice,note=a%20b"),
    ]))
}

/// The baggage members that went out, sorted (OpenTelemetry's baggage has no order).
fn sorted_baggage(headers: &HeaderMap) -> Vec<String> {
    let mut members: Vec<String> = headers["baggage"]
        .to_str()
        .unwrap()
        .split(',')
        .map(str::to_owned)
        .collect();
    members.sort();
    members
}

fn outgoing_traceparent(headers: &HeaderMap) -> TraceParent {
    headers["traceparent"].to_str().unwrap().parse().unwrap()
}
#[tokio::test(flavor = "current_thread")]
async fn injects_the_current_span_as_parent() {
    let (a, b) = contextflow_otel::scope(incoming(), async {
        let a = send(Request::new(())).await;
        let b = send(Request::new(())).await;
        (a, b)
    })
    .await;
    let (tp_a, tp_b) = (outgoing_traceparent(&a), outgoing_traceparent(&b));
    assert_eq!(
        tp_a.trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    // No span of ours (no tracer): the current span, the caller's, is the parent.
    assert_eq!(tp_a.parent_id().to_string(), "00f067aa0ba902b7");
    assert_eq!(tp_b, tp_a);
    assert_eq!(tp_a.flags().to_u8(), 0x03, "flags preserved");
    assert_eq!(a["tracestate"], "congo=t61rcWkgMzE");
    assert_eq!(sorted_baggage(&a), ["note=a%20b", "userId=alice"]);
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
    let headers = contextflow_otel::scope(incoming(), send(req)).await;
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
    let handles = contextflow_otel::scope(incoming(), async {
        (0..8)
            .map(|_| contextflow::spawn(send(Request::new(()))))
            .collect::<Vec<_>>()
    })
    .await;
    for handle in handles {
        let headers = handle.await.unwrap();
        assert_eq!(
            outgoing_traceparent(&headers).trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(headers["x-request-id"], "req-7");
        assert_eq!(sorted_baggage(&headers), ["note=a%20b", "userId=alice"]);
    }
    // A plain tokio::spawn does not inherit; `in_current_context` carries it over.
    let plain = contextflow_otel::scope(incoming(), async {
        tokio::spawn(send(Request::new(()))).await
    })
    .await;
    assert!(!plain.unwrap().contains_key("x-request-id"));
    let carried = contextflow_otel::scope(incoming(), async {
        tokio::spawn(send(Request::new(())).in_current_context()).await
    })
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
        tower_test::mock::spawn_layer::<Request<()>, Response<()>, _>(InjectContextLayer::new());
    handle.allow(0);
    assert!(svc.poll_ready().is_pending());
    handle.allow(1);
    assert!(matches!(svc.poll_ready(), std::task::Poll::Ready(Ok(()))));
    let fut = contextflow_otel::sync_scope(incoming(), || svc.call(Request::new(())));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()["x-request-id"], "req-7");
    send.send_response(Response::new(()));
    fut.await.unwrap();
}

/// A client layer that sends baggage only to `*.internal` hosts, over a service that answers
/// with the headers it got.
fn internal_only_client(
) -> tower::util::BoxCloneSyncService<Request<()>, Response<HeaderMap>, Infallible> {
    tower::util::BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(
                InjectContextLayer::new()
                    .baggage_only_to(|uri| uri.host().is_some_and(|h| h.ends_with(".internal"))),
            )
            .service(service_fn(|req: Request<()>| async move {
                Ok::<_, Infallible>(Response::new(req.headers().clone()))
            })),
    )
}

/// With `baggage_only_to`, a request to a host outside the trust boundary carries the trace
/// context and the request id, not the baggage its callers upstream put in (W3C Baggage:
/// baggage must not leak beyond the system's trust boundary); one to an allowed host does.
#[tokio::test(flavor = "current_thread")]
async fn baggage_goes_only_where_the_filter_allows() {
    let client = internal_only_client();
    let send_to = |uri: &'static str| {
        let client = client.clone();
        async move {
            client
                .oneshot(Request::builder().uri(uri).body(()).unwrap())
                .await
                .unwrap()
                .into_body()
        }
    };
    let (outside, inside) = contextflow_otel::scope(incoming(), async {
        (
            send_to("https://api.partner.example/charge").await,
            send_to("http://orders.internal/orders").await,
        )
    })
    .await;
    assert!(outside.get("baggage").is_none(), "{outside:?}");
    assert_eq!(outside["x-request-id"], "req-7");
    assert!(outside.contains_key("traceparent"));
    assert_eq!(sorted_baggage(&inside), ["note=a%20b", "userId=alice"]);

    // Host names compare without regard to case: a deny-list is not got past with capitals.
    let deny = ServiceBuilder::new()
        .layer(
            InjectContextLayer::new()
                .baggage_only_to(|uri| uri.host() != Some("api.partner.example")),
        )
        .service(service_fn(|req: Request<()>| async move {
            Ok::<_, Infallible>(Response::new(req.headers().clone()))
        }));
    let (upper, other) = contextflow_otel::scope(incoming(), async {
        let send = |uri: &'static str| {
            deny.clone()
                .oneshot(Request::builder().uri(uri).body(()).unwrap())
        };
        (
            send("https://API.Partner.example/charge")
                .await
                .unwrap()
                .into_body(),
            send("https://orders.example/x").await.unwrap().into_body(),
        )
    })
    .await;
    assert!(upper.get("baggage").is_none(), "{upper:?}");
    assert!(other.contains_key("baggage"), "{other:?}");

    // Nor with a trailing dot (the same host in DNS), with or without user info and a port.
    let dotted = contextflow_otel::scope(incoming(), async {
        let mut seen = Vec::new();
        for uri in [
            "https://api.partner.example./charge",
            "https://user@API.partner.example.:8443/charge",
        ] {
            let req = Request::builder().uri(uri).body(()).unwrap();
            seen.push(deny.clone().oneshot(req).await.unwrap().into_body());
        }
        seen
    })
    .await;
    for headers in &dotted {
        assert!(headers.get("baggage").is_none(), "{headers:?}");
    }

    // A request without a host (a tonic channel's: the channel adds it below the layers) gets
    // none with a filter; a `baggage` header the caller copied onto a refused request is
    // removed, not sent on.
    let (hostless, copied) = contextflow_otel::scope(incoming(), async {
        let hostless = Request::builder()
            .uri("/pkg.Orders/Create")
            .body(())
            .unwrap();
        let copied = Request::builder()
            .uri("https://api.partner.example/charge")
            .header("baggage", "userId=alice,tenant=acme")
            .body(())
            .unwrap();
        (
            deny.clone().oneshot(hostless).await.unwrap().into_body(),
            deny.clone().oneshot(copied).await.unwrap().into_body(),
        )
    })
    .await;
    assert!(hostless.get("baggage").is_none(), "{hostless:?}");
    assert!(copied.get("baggage").is_none(), "{copied:?}");
}

/// Review finding: the filter saw only the URI. A request to an allowed host that names
/// another in its `Host` header (a gateway forwards by `Host`) carried the baggage there.
#[tokio::test(flavor = "current_thread")]
async fn baggage_filter_reads_the_host_header_too() {
    let client = internal_only_client();
    let send = |host: Option<&'static str>| {
        let client = client.clone();
        async move {
            let mut req = Request::builder().uri("http://egress.internal/charge");
            if let Some(host) = host {
                req = req.header("host", host);
            }
            client
                .oneshot(req.body(()).unwrap())
                .await
                .unwrap()
                .into_body()
        }
    };
    let (partner, same, bad) = contextflow_otel::scope(incoming(), async {
        (
            send(Some("api.partner.example")).await,
            send(Some("Egress.Internal:8080")).await,
            send(Some("not a host")).await,
        )
    })
    .await;
    assert!(partner.get("baggage").is_none(), "{partner:?}");
    assert_eq!(partner["x-request-id"], "req-7");
    assert_eq!(sorted_baggage(&same), ["note=a%20b", "userId=alice"]);
    assert!(bad.get("baggage").is_none(), "{bad:?}");
}

/// A second trace format beside W3C's: B3's headers, writing the current span.
#[derive(Debug)]
struct OtherFormat;

impl opentelemetry::propagation::TextMapPropagator for OtherFormat {
    fn inject_context(
        &self,
        cx: &OtelContext,
        injector: &mut dyn opentelemetry::propagation::Injector,
    ) {
        use opentelemetry::trace::TraceContextExt as _;
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            // As B3's multi-header format writes it.
            injector.set("x-b3-traceid", sc.trace_id().to_string());
            injector.set("x-b3-spanid", sc.span_id().to_string());
        }
    }

    fn extract_with_context(
        &self,
        cx: &OtelContext,
        _: &dyn opentelemetry::propagation::Extractor,
    ) -> OtelContext {
        cx.clone()
    }

    fn fields(&self) -> opentelemetry::propagation::text_map_propagator::FieldIter<'_> {
        opentelemetry::propagation::text_map_propagator::FieldIter::new(&[])
    }
}

/// Review finding: a caller's `traceparent` was kept whatever it held, and every trace
/// header of ours left out (a proxy copying `traceparent: garbage` broke the trace); a
/// caller's `tracestate` member that breaks the grammar was merged after ours, and a W3C
/// receiver drops such a list whole. Now the malformed or repeated `traceparent` is replaced by
/// ours, and the bad member is left out.
#[tokio::test(flavor = "current_thread")]
async fn malformed_caller_trace_headers_are_replaced_or_left_out() {
    let sent = |headers: Vec<(&'static str, &'static str)>| async move {
        let mut req = Request::builder();
        for (name, value) in headers {
            req = req.header(name, value);
        }
        contextflow_otel::scope(incoming(), send(req.body(()).unwrap())).await
    };
    for bad in [
        vec![("traceparent", "garbage")],
        vec![(
            "traceparent",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        )],
        vec![
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ],
    ] {
        let headers = sent(bad.clone()).await;
        let values: Vec<_> = headers.get_all("traceparent").iter().collect();
        assert_eq!(values.len(), 1, "{bad:?}: {headers:?}");
        assert_eq!(
            outgoing_traceparent(&headers).trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "ours, from the current context: {bad:?}"
        );
        assert_eq!(headers["tracestate"], "congo=t61rcWkgMzE", "{bad:?}");
    }
    let headers = sent(vec![("tracestate", "Bad=1,good=2")]).await;
    assert_eq!(headers["tracestate"], "congo=t61rcWkgMzE,good=2");
}

/// Review finding: OpenTelemetry SDK's W3C propagator writes `tracestate` even when the span
/// has no members: the request went out with an empty `tracestate:` header (which the W3C
/// text says to avoid), or, with the caller's members, a list that started with a comma.
#[tokio::test(flavor = "current_thread")]
async fn an_empty_tracestate_is_not_sent() {
    let client = ServiceBuilder::new()
        .layer(
            InjectContextLayer::new()
                .with_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new()),
        )
        .service(service_fn(|req: Request<()>| async move {
            Ok::<_, Infallible>(Response::new(req.headers().clone()))
        }));
    let without_members = contextflow_otel::extract(&Pairs::new([(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )]));
    let (alone, with_theirs, bad_theirs) = contextflow_otel::scope(without_members, async {
        let send = |state: Option<&'static str>| {
            let mut req = Request::builder();
            if let Some(state) = state {
                req = req.header("tracestate", state);
            }
            client.clone().oneshot(req.body(()).unwrap())
        };
        (
            send(None).await.unwrap().into_body(),
            send(Some("a=1, b=2")).await.unwrap().into_body(),
            send(Some("Bad=1")).await.unwrap().into_body(),
        )
    })
    .await;
    assert!(alone.contains_key("traceparent"), "{alone:?}");
    assert!(alone.get("tracestate").is_none(), "{alone:?}");
    assert_eq!(with_theirs["tracestate"], "a=1,b=2");
    assert!(bad_theirs.get("tracestate").is_none(), "{bad_theirs:?}");
}

/// Review finding: contextflow's own W3C propagator writes no `tracestate` for a span without
/// members, so the caller's went out unchecked (a malformed member, 40 members, a line that is
/// not text), and a W3C receiver drops such a list whole. Now it is checked the same way as
/// when ours is merged; a caller's valid `traceparent` still keeps its `tracestate` whole.
#[tokio::test(flavor = "current_thread")]
async fn a_callers_tracestate_is_checked_when_ours_is_empty() {
    let client = ServiceBuilder::new()
        .layer(InjectContextLayer::new())
        .service(service_fn(|req: Request<()>| async move {
            Ok::<_, Infallible>(Response::new(req.headers().clone()))
        }));
    let without_members = contextflow_otel::extract(&Pairs::new([(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )]));
    let forty: String = (0..40)
        .map(|i| format!("k{i}=v"))
        .collect::<Vec<_>>()
        .join(",");
    let sent = |headers: Vec<(&'static str, HeaderValue)>| {
        let client = client.clone();
        let without_members = without_members.clone();
        async move {
            let mut req = Request::new(());
            for (name, value) in headers {
                req.headers_mut().append(name, value);
            }
            contextflow_otel::scope(without_members, client.oneshot(req))
                .await
                .unwrap()
                .into_body()
        }
    };
    let text = |s: &str| HeaderValue::from_str(s).unwrap();

    let bad = sent(vec![("tracestate", text("Bad=1"))]).await;
    assert!(bad.contains_key("traceparent"), "{bad:?}");
    assert!(bad.get("tracestate").is_none(), "{bad:?}");

    let many = sent(vec![("tracestate", text(&forty))]).await;
    let members: Vec<&str> = many["tracestate"].to_str().unwrap().split(',').collect();
    assert_eq!(members.len(), 32, "{many:?}");
    assert_eq!(members[31], "k31=v");

    let mixed = sent(vec![
        (
            "tracestate",
            HeaderValue::from_bytes(b"caf\xc3\xa9=1").unwrap(),
        ),
        ("tracestate", text("good=2, Bad=3")),
    ])
    .await;
    let lines: Vec<_> = mixed.get_all("tracestate").iter().collect();
    assert_eq!(lines, [text("good=2")], "{mixed:?}");

    let fine = sent(vec![("tracestate", text("a=1, b=2"))]).await;
    assert_eq!(fine["tracestate"], "a=1,b=2");

    // The caller's own trace context goes out whole, as it was set.
    let theirs = sent(vec![
        (
            "traceparent",
            text("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ),
        ("tracestate", text("Bad=1")),
    ])
    .await;
    assert_eq!(theirs["tracestate"], "Bad=1");
}

/// A trace context the caller set wins whole: no second format naming our span as another
/// parent; and a `tracestate` the caller set without a `traceparent` goes out after our
/// members.
#[tokio::test(flavor = "current_thread")]
async fn a_caller_set_trace_context_wins_whole() {
    let composite = opentelemetry::propagation::TextMapCompositePropagator::new(vec![
        Box::new(contextflow_otel::TraceContextPropagator::new()),
        Box::new(OtherFormat),
    ]);
    let client = ServiceBuilder::new()
        .layer(InjectContextLayer::new().with_propagator(composite))
        .service(service_fn(|req: Request<()>| async move {
            Ok::<_, Infallible>(Response::new(req.headers().clone()))
        }));
    let mine = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (with_parent, with_state) = contextflow_otel::scope(incoming(), async {
        let with_parent = client
            .clone()
            .oneshot(
                Request::builder()
                    .header("traceparent", mine)
                    .body(())
                    .unwrap(),
            )
            .await
            .unwrap()
            .into_body();
        let with_state = client
            .clone()
            .oneshot(
                Request::builder()
                    .header("tracestate", "stale=1")
                    .body(())
                    .unwrap(),
            )
            .await
            .unwrap()
            .into_body();
        (with_parent, with_state)
    })
    .await;
    assert_eq!(with_parent["traceparent"], mine);
    assert!(with_parent.get("x-b3-spanid").is_none(), "{with_parent:?}");
    assert!(with_parent.get("tracestate").is_none(), "{with_parent:?}");
    assert_eq!(with_parent["x-request-id"], "req-7");
    assert!(with_state["traceparent"]
        .to_str()
        .unwrap()
        .contains("4bf92f3577b34da6a3ce929d0e0e4736"));
    assert_eq!(
        with_state["tracestate"], "congo=t61rcWkgMzE,stale=1",
        "ours first, then the caller's"
    );
    assert!(with_state.contains_key("x-b3-spanid"));

    // The caller's `tracestate` in several lines: every line's members, in order, after ours
    // (the first line alone was kept); and never more than the 32 members a list may have,
    // which a receiver would drop whole.
    let many: Vec<String> = (0..40).map(|i| format!("k{i}=v")).collect();
    let sent = |lines: Vec<String>| {
        let client = client.clone();
        contextflow_otel::scope(incoming(), async move {
            let mut req = Request::builder();
            for line in lines {
                req = req.header("tracestate", line);
            }
            let headers = client
                .oneshot(req.body(()).unwrap())
                .await
                .unwrap()
                .into_body();
            let lines: Vec<String> = headers
                .get_all("tracestate")
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            lines
        })
    };
    assert_eq!(
        sent(vec!["a=1".into(), "b=2,congo=old".into()]).await,
        ["congo=t61rcWkgMzE,a=1,b=2"]
    );
    let capped = sent(vec![many[..20].join(","), many[20..].join(",")]).await;
    assert_eq!(capped.len(), 1);
    let members: Vec<&str> = capped[0].split(',').collect();
    assert_eq!(members.len(), 32, "{capped:?}");
    assert_eq!(members[0], "congo=t61rcWkgMzE");
    assert_eq!(
        members[1..],
        many[..31].iter().map(String::as_str).collect::<Vec<_>>()[..]
    );
    // Past 512 characters: the members that fit are kept (whole), not all of them dropped.
    // (A member's value is at most 256 characters: longer ones break the grammar.)
    let long = format!("big={}", "x".repeat(250));
    let big = format!("huge={}", "y".repeat(250));
    let fitted = sent(vec!["a=1".into(), long.clone(), big, "b=2".into()]).await;
    assert_eq!(fitted, [format!("congo=t61rcWkgMzE,a=1,{long},b=2")]);
}
