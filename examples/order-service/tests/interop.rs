//! A real peer in another language: Python's OpenTelemetry SDK (`interop/peer.py`) calls the
//! order service with `traceparent` and `baggage`, the order service calls it back as its
//! payment provider, and the trace continues unbroken both ways. The order service's spans go
//! over OTLP to the in-process receiver; the peer prints its own.
//!
//! Needs `CONTEXTFLOW_OTEL_PYTHON`, a Python with `opentelemetry-sdk` (`.ci/run` makes one);
//! without it the test is reported ignored, with the variable to set; under
//! `CONTEXTFLOW_REQUIRE_SERVICES=1` it fails instead. Its own process: it installs
//! OpenTelemetry's global tracer provider.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    process::{Child, ChildStdout, Command, Stdio},
};

use opentelemetry_proto::tonic::trace::v1::span::SpanKind as Kind;
use order_service::{
    app::{self, Config},
    demo::traces::analyze,
    telemetry::{Receiver, SpanRecord, Telemetry, ORDER_SERVICE},
};
use serde_json::Value;

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/peer.py");

/// Reads one line of the peer's output as JSON (on a blocking thread), or panics with what
/// the peer wrote to stderr.
async fn read_json(
    child: &mut Child,
    stdout: BufReader<ChildStdout>,
) -> (Value, BufReader<ChildStdout>) {
    let (line, stdout) = tokio::task::spawn_blocking(move || {
        let mut stdout = stdout;
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        (line, stdout)
    })
    .await
    .expect("reader");
    match serde_json::from_str(&line) {
        Ok(value) => (value, stdout),
        Err(_) => {
            let _ = child.kill();
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            panic!("the Python peer wrote {line:?}; stderr:\n{stderr}");
        }
    }
}

/// Runs the exchange once; returns what the peer printed and the order service's spans.
async fn exchange(python: &str) -> (Value, Vec<SpanRecord>) {
    let receiver = Receiver::start().await.expect("receiver");
    let telemetry = Telemetry::otlp(Some(&receiver.endpoint())).expect("exporter");
    telemetry.install_global();

    let mut child = Command::new(python)
        .arg(PEER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {python}: {err}"));
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let (hello, stdout) = read_json(&mut child, stdout).await;
    let port = hello["port"].as_u64().expect("the peer's port");

    let dir = tempfile::tempdir().expect("temp dir");
    let url = app::sqlite_url(&dir.path().join("orders.db"));
    let service = app::start(Config {
        payment_url: Some(format!("http://127.0.0.1:{port}")),
        telemetry: Some(telemetry.clone()),
        ..Config::local(&url)
    })
    .await
    .expect("service starts");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "http://{}", service.addr).expect("write to the peer");
    drop(stdin);
    let (report, _stdout) = read_json(&mut child, stdout).await;
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;

    service.state.outbox.wait_delivered().await;
    service.state.queue.wait_idle().await;
    service.shutdown().await.expect("shutdown");
    let errors = telemetry.shutdown().await;
    assert!(errors.is_empty(), "{errors:?}");
    (report, receiver.spans())
}

fn str_of<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    let mut v = value;
    for key in path {
        v = &v[*key];
    }
    v.as_str()
        .unwrap_or_else(|| panic!("{path:?} in {value:#}"))
}

fn check(report: &Value, spans: &[SpanRecord]) {
    assert_eq!(report["status"], 201, "{report:#}");
    let trace_id = str_of(report, &["client", "trace_id"]);
    let python_client = str_of(report, &["client", "span_id"]);
    assert_eq!(
        report["client"]["parent_span_id"],
        Value::Null,
        "the peer's client span is the root"
    );

    // Python -> Rust: the order service's server span continues the peer's client span.
    let one = |kind: Kind| {
        let found: Vec<&SpanRecord> = spans
            .iter()
            .filter(|s| s.service == ORDER_SERVICE && s.kind == kind)
            .collect();
        assert_eq!(found.len(), 1, "one {kind:?} span: {spans:#?}");
        found[0]
    };
    let server = one(Kind::Server);
    let payment_call = one(Kind::Client);
    assert!(
        spans.iter().all(|s| s.trace_id == trace_id),
        "one trace id: {spans:#?}"
    );
    assert_eq!(server.parent_span_id.as_deref(), Some(python_client));
    assert_eq!(
        payment_call.parent_span_id.as_deref(),
        Some(server.span_id.as_str())
    );

    // Rust -> Python: the peer's server span continues the order service's client span.
    assert_eq!(
        str_of(report, &["server", "trace_id"]),
        trace_id,
        "{report:#}"
    );
    assert_eq!(
        str_of(report, &["server", "parent_span_id"]),
        payment_call.span_id,
        "{report:#}"
    );
    assert_eq!(report["server"]["parent_is_remote"], true);
    // The flags go on as the peer sent them (Python's SDK sets the Level 2 `random` flag, 0x02).
    let sent = str_of(report, &["sent", "traceparent"]);
    let flags = &sent[sent.len() - 2..];
    assert_eq!(
        str_of(report, &["seen", "traceparent"]),
        format!("00-{trace_id}-{}-{flags}", payment_call.span_id)
    );
    // The baggage the peer sent came back to it through the order service, and the request
    // id too.
    assert_eq!(
        report["seen"]["baggage"],
        serde_json::json!({"interop.peer": "python", "order.channel": "partner-api"}),
        "{report:#}"
    );
    assert_eq!(str_of(report, &["seen", "request_id"]), "interop-python-1");

    // With the peer's two spans added, the whole trace is connected: one root (the peer's
    // client span), every parent present.
    let mut all = spans.to_vec();
    for (key, kind) in [("client", Kind::Client), ("server", Kind::Server)] {
        all.push(SpanRecord {
            service: "python-peer".into(),
            trace_id: str_of(report, &[key, "trace_id"]).into(),
            span_id: str_of(report, &[key, "span_id"]).into(),
            parent_span_id: report[key]["parent_span_id"].as_str().map(str::to_owned),
            name: str_of(report, &[key, "name"]).into(),
            kind,
            links: Vec::new(),
            trace_flags: 1,
        });
    }
    let analysis = analyze(&all);
    assert_eq!(
        (
            analysis.traces,
            analysis.connected,
            analysis.fragmented,
            analysis.unlinked
        ),
        (1, 1, 0, 0),
        "{analysis:#?}"
    );
    // Without the peer's spans, the order service's are not a whole trace: the check sees it.
    assert_eq!(analyze(spans).fragmented, 1);
}

#[test]
#[cfg_attr(
    not(cf_service_otel_python),
    ignore = "needs Python with opentelemetry-sdk: set CONTEXTFLOW_OTEL_PYTHON (see .ci/run)"
)]
fn python_peer_continues_the_trace_both_ways() {
    let python = contextflow_testenv::url(contextflow_testenv::Service::OtelPython);
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
        let (report, spans) = runtime.block_on(exchange(&python));
        check(&report, &spans);
    }
}
