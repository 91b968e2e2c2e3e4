//! Spans exported over real OTLP/HTTP (`opentelemetry-otlp`, protobuf) to the in-process
//! receiver, which decodes them with `opentelemetry-proto`: one order is one connected trace
//! across the client, the order service, the payment stub and the queue consumer. Its own
//! process: it installs OpenTelemetry's global tracer provider.

use std::collections::HashMap;

use opentelemetry::trace::{Span as _, SpanKind, Tracer as _};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind as Kind;
use order_service::{
    app::{self, Config},
    demo::traces::analyze,
    telemetry::{Receiver, SpanRecord, Telemetry, DEMO_CLIENT, ORDER_SERVICE, PAYMENT_SERVICE},
};

/// Places one order through the real service with every span exported to a fresh receiver;
/// returns the spans received and the trace id the client started.
async fn one_order_exported() -> (Vec<SpanRecord>, String) {
    let receiver = Receiver::start().await.expect("receiver");
    let telemetry = Telemetry::otlp(Some(&receiver.endpoint())).expect("exporter");
    telemetry.install_global();
    let dir = tempfile::tempdir().expect("temp dir");
    let url = app::sqlite_url(&dir.path().join("orders.db"));
    let service = app::start(Config {
        telemetry: Some(telemetry.clone()),
        ..Config::local(&url)
    })
    .await
    .expect("service starts");

    let tracer = telemetry.client_tracer();
    let mut span = tracer
        .span_builder("POST /orders")
        .with_kind(SpanKind::Client)
        .start_with_context(&tracer, &opentelemetry::Context::new());
    let sc = span.span_context().clone();
    let traceparent = format!("00-{}-{}-01", sc.trace_id(), sc.span_id());
    let response = reqwest::Client::new()
        .post(format!("http://{}/orders", service.addr))
        .header("authorization", "Bearer token-acme")
        .header("traceparent", traceparent)
        .json(&serde_json::json!({"reference": "otlp-1", "items": [{"sku": "sku-apple", "quantity": 1}]}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 201);
    span.end();
    service.state.outbox.wait_delivered().await;
    service.state.queue.wait_idle().await;
    service.shutdown().await.expect("shutdown");
    let errors = telemetry.shutdown().await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(receiver.rejected(), 0);
    (receiver.spans(), sc.trace_id().to_string())
}

fn check_one_connected_trace(spans: &[SpanRecord], trace_id: &str) {
    let analysis = analyze(spans);
    assert_eq!(
        (analysis.traces, analysis.connected, analysis.fragmented),
        (1, 1, 0),
        "{analysis:#?}\n{spans:#?}"
    );
    assert_eq!(analysis.unlinked, 0);
    assert!(spans.iter().all(|s| s.trace_id == trace_id), "{spans:#?}");
    let by_id: HashMap<&str, &SpanRecord> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let find = |service: &str, kind: Kind| {
        let found: Vec<&SpanRecord> = spans
            .iter()
            .filter(|s| s.service == service && s.kind == kind)
            .collect();
        assert_eq!(found.len(), 1, "one {kind:?} span of {service}: {spans:#?}");
        found[0]
    };
    let parent = |span: &SpanRecord| by_id[span.parent_span_id.as_deref().expect("a parent")];
    let client = find(DEMO_CLIENT, Kind::Client);
    let server = find(ORDER_SERVICE, Kind::Server);
    let payment_call = find(ORDER_SERVICE, Kind::Client);
    let payment = find(PAYMENT_SERVICE, Kind::Server);
    let producer = find(ORDER_SERVICE, Kind::Producer);
    let consumer = find(ORDER_SERVICE, Kind::Consumer);
    assert_eq!(client.parent_span_id, None, "the client is the root");
    assert_eq!(parent(server).span_id, client.span_id);
    assert_eq!(parent(payment_call).span_id, server.span_id);
    assert_eq!(parent(payment).span_id, payment_call.span_id);
    // The outbox worker publishes in the context stored with the row: the request's.
    assert_eq!(parent(producer).span_id, server.span_id);
    assert_eq!(parent(consumer).span_id, producer.span_id);
    assert_eq!(
        consumer.links,
        [(producer.trace_id.clone(), producer.span_id.clone())],
        "the consumer links to its producer"
    );
    assert_eq!(spans.len(), 6, "{spans:#?}");
    assert!(spans.iter().all(|s| s.trace_flags & 1 == 1), "sampled");
    // FIXME: Trace Context Level 2's `random` flag (0x02) is not set, although the trace id
    // comes from `SecureIdGenerator` (a CSPRNG): opentelemetry_sdk 0.33 builds a root span's
    // flags itself, with no hook for an id generator to say its ids are random. Never claimed,
    // then; an incoming `random` flag is passed on (tests/interop.rs).
    assert!(spans.iter().all(|s| s.trace_flags & 2 == 0), "not claimed");
}

/// The whole path, on both runtimes (one test: the global provider is process-wide).
#[test]
fn one_order_is_one_connected_trace_over_otlp() {
    for multi_thread in [false, true] {
        let runtime = if multi_thread {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        .expect("runtime");
        let (spans, trace_id) = runtime.block_on(one_order_exported());
        check_one_connected_trace(&spans, &trace_id);

        // The check can fail: with the order service's server span lost, the same spans are
        // a fragmented trace, and the report says which parent is missing.
        let without_server: Vec<SpanRecord> = spans
            .iter()
            .filter(|s| !(s.service == ORDER_SERVICE && s.kind == Kind::Server))
            .cloned()
            .collect();
        let analysis = analyze(&without_server);
        assert_eq!((analysis.connected, analysis.fragmented), (0, 1));
        assert!(
            analysis.problems[0].contains("missing"),
            "{:?}",
            analysis.problems
        );
    }
}

/// The receiver takes only OTLP protobuf, and a body that does not decode is refused.
#[tokio::test(flavor = "current_thread")]
async fn the_receiver_refuses_what_is_not_otlp_protobuf() {
    let receiver = Receiver::start().await.expect("receiver");
    let client = reqwest::Client::new();
    let post = |content_type: &'static str, body: &'static [u8]| {
        client
            .post(receiver.endpoint())
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let json = post("application/json", b"{}").await.expect("request");
    assert_eq!(json.status(), 415);
    // Field 1, length-delimited, claiming 200 bytes that are not there.
    let garbage = post("application/x-protobuf", b"\x0a\xc8\x01\x01")
        .await
        .expect("request");
    assert_eq!(garbage.status(), 400);
    let empty = post("application/x-protobuf", b"").await.expect("request");
    assert_eq!(empty.status(), 200, "an empty request is a valid one");
    assert_eq!(receiver.rejected(), 2);
    assert!(receiver.spans().is_empty());
}

/// The binary, serving with `OTEL_EXPORTER_OTLP_ENDPOINT` set, exports its spans there: the
/// order service's and the payment stub's, continuing the caller's `traceparent`, all of them
/// flushed by the graceful shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exports_when_the_endpoint_is_set() {
    use std::io::{BufRead as _, BufReader};

    let receiver = Receiver::start().await.expect("receiver");
    let base = receiver
        .endpoint()
        .trim_end_matches("/v1/traces")
        .to_owned();
    let dir = tempfile::tempdir().expect("temp dir");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_order-service"))
        .args(["--addr", "127.0.0.1:0"])
        .env("DATABASE_URL", app::sqlite_url(&dir.path().join("bin.db")))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &base)
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start the service");
    let mut served = KillOnDrop(Some(child));
    let stdout = served.child().stdout.take().expect("stdout");
    let addr = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let addr = lines
            .by_ref()
            .take(50)
            .map_while(Result::ok)
            .find_map(|line| {
                line.strip_prefix("order-service listening on ")
                    .map(str::to_string)
            });
        // Keep draining so the service never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        addr
    })
    .await
    .expect("reader")
    .expect("the service printed its address");

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let response = reqwest::Client::new()
        .post(format!("{addr}/orders"))
        .header("authorization", "Bearer token-acme")
        .header("traceparent", format!("00-{trace_id}-{caller}-01"))
        .json(&serde_json::json!({"reference": "bin-otlp", "items": [{"sku": "sku-pear", "quantity": 1}]}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &served.child().id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || served.child().wait())
        .await
        .expect("waiter")
        .expect("exit status");
    assert!(exit.success(), "{exit:?}");

    let spans = receiver.spans();
    assert_eq!(receiver.rejected(), 0);
    let kinds = |service: &str| {
        let mut kinds: Vec<Kind> = spans
            .iter()
            .filter(|s| s.service == service)
            .map(|s| s.kind)
            .collect();
        kinds.sort_by_key(|k| *k as i32);
        kinds
    };
    assert_eq!(
        kinds(ORDER_SERVICE),
        [Kind::Server, Kind::Client, Kind::Producer, Kind::Consumer],
        "{spans:#?}"
    );
    assert_eq!(kinds(PAYMENT_SERVICE), [Kind::Server], "{spans:#?}");
    assert!(spans.iter().all(|s| s.trace_id == trace_id), "{spans:#?}");
    let server = spans
        .iter()
        .find(|s| s.service == ORDER_SERVICE && s.kind == Kind::Server)
        .expect("server span");
    assert_eq!(server.parent_span_id.as_deref(), Some(caller));
    // Everything but the caller's span arrived: one root missing, nothing else.
    let analysis = analyze(&spans);
    assert_eq!(analysis.fragmented, 1);
    assert_eq!(analysis.problems.len(), 1, "{:?}", analysis.problems);
    assert!(
        analysis.problems[0].contains(&format!("0 root(s); parent {caller} of [")),
        "{:?}",
        analysis.problems
    );
}

/// Kills the served binary if the test fails before it stops: an orphan would keep every file
/// descriptor it inherited from the test runner open.
struct KillOnDrop(Option<std::process::Child>);

impl KillOnDrop {
    fn child(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("the child is kept until drop")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `demo --trace-file PATH`: the summary has the traces line, and the file is OTLP JSON that
/// reads back as `TracesData` with every span of every order.
#[test]
fn the_demo_writes_its_spans_as_otlp_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("traces.json");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_order-service"))
        .args([
            "demo",
            "--orders",
            "20",
            "--concurrency",
            "4",
            "--trace-file",
        ])
        .arg(&path)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("ok   traces             20 connected, 0 fragmented;"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(&path).expect("trace file");
    assert_eq!(text.lines().count(), 1, "one JSON object on one line");
    let data: opentelemetry_proto::tonic::trace::v1::TracesData =
        serde_json::from_str(&text).expect("OTLP JSON");
    let spans = order_service::telemetry::receiver::records(&data.resource_spans);
    assert_eq!(spans.len(), 20 * 6);
    let analysis = analyze(&spans);
    assert_eq!((analysis.connected, analysis.fragmented), (20, 0));
    // OTLP JSON spells ids in hex, not base64 as protobuf's JSON mapping would.
    let raw: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let first = &raw["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
    assert_eq!(first["traceId"].as_str().map(str::len), Some(32), "{first}");
    assert_eq!(first["spanId"].as_str().map(str::len), Some(16), "{first}");
}
