//! An in-process OTLP/HTTP receiver: `POST /v1/traces` with an `ExportTraceServiceRequest` in
//! protobuf, decoded with `opentelemetry-proto`'s generated types, as a collector does. The
//! demo and the tests export to it and check what arrived.
//!
//! It logs nothing while it works (the demo attributes every log line to a request); a
//! request it cannot decode is answered `400` and counted ([`Receiver::rejected`]).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{header::CONTENT_TYPE, HeaderMap, StatusCode},
    response::IntoResponse,
    routing::post,
    Router,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    common::v1::any_value::Value,
    trace::v1::{span::SpanKind, ResourceSpans, TracesData},
};
use prost::Message as _;
use tokio::{net::TcpListener, task::JoinHandle};

/// The largest export request accepted (the exporter sends at most 1,024 spans at once).
pub const MAX_REQUEST_BYTES: usize = 32 << 20;

/// A running receiver on 127.0.0.1; stops when dropped.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    state: Arc<Received>,
    task: JoinHandle<()>,
}

/// One span as received, with what the checks need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanRecord {
    /// The `service.name` of the resource that sent it.
    pub service: String,
    /// 32 lower-case hex digits.
    pub trace_id: String,
    /// 16 lower-case hex digits.
    pub span_id: String,
    /// 16 lower-case hex digits, or `None` for a root span.
    pub parent_span_id: Option<String>,
    /// The span's name.
    pub name: String,
    /// Its kind.
    pub kind: SpanKind,
    /// The spans it links to, as `(trace id, span id)`.
    pub links: Vec<(String, String)>,
    /// Its W3C trace flags (the low byte of the OTLP `flags` field).
    pub trace_flags: u8,
}

#[derive(Debug, Default)]
struct Received {
    batches: Mutex<Vec<ResourceSpans>>,
    rejected: AtomicUsize,
}

// ===== impl Receiver =====

impl Receiver {
    /// Binds a free port of 127.0.0.1 and serves `POST /v1/traces`.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start() -> std::io::Result<Receiver> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Received::default());
        let router = Router::new()
            .route("/v1/traces", post(accept))
            .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
            .with_state(state.clone());
        // The receiver belongs to no request: it runs in an empty context.
        let task = contextflow::spawn_without_context(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Receiver { addr, state, task })
    }

    /// The traces URL to export to: `http://127.0.0.1:<port>/v1/traces`.
    pub fn endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<SpanRecord> {
        records(&self.lock())
    }

    /// Everything received so far, as OTLP `TracesData` (for a trace file).
    pub fn traces_data(&self) -> TracesData {
        TracesData {
            resource_spans: self.lock().clone(),
        }
    }

    /// How many export requests were refused (undecodable, wrong content type).
    pub fn rejected(&self) -> usize {
        self.state.rejected.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ResourceSpans>> {
        lock(&self.state)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `TracesData` as OTLP JSON (the encoding the OpenTelemetry Collector's file exporter writes and
/// trace viewers import): one JSON object on one line.
///
/// # Errors
/// Never in practice (every field serializes); `serde_json`'s error otherwise.
pub fn to_otlp_json(data: &TracesData) -> serde_json::Result<String> {
    serde_json::to_string(data)
}

/// The spans of `batches`, each with its resource's `service.name`.
pub fn records(batches: &[ResourceSpans]) -> Vec<SpanRecord> {
    let mut out = Vec::new();
    for batch in batches {
        let service = batch
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| match &v.value {
                Some(Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for span in batch.scope_spans.iter().flat_map(|s| &s.spans) {
            out.push(SpanRecord {
                service: service.clone(),
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: (!span.parent_span_id.is_empty())
                    .then(|| hex(&span.parent_span_id)),
                name: span.name.clone(),
                kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                links: span
                    .links
                    .iter()
                    .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                    .collect(),
                trace_flags: (span.flags & 0xff) as u8,
            });
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn lock(state: &Received) -> std::sync::MutexGuard<'_, Vec<ResourceSpans>> {
    // Only `extend` and `clone` run under the lock: a panic cannot leave it half-changed.
    state.batches.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn accept(
    State(state): State<Arc<Received>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let protobuf = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-protobuf"));
    if !protobuf {
        state.rejected.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            [(CONTENT_TYPE, "text/plain")],
            Vec::new(),
        );
    }
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            lock(&state).extend(request.resource_spans);
            (
                StatusCode::OK,
                [(CONTENT_TYPE, "application/x-protobuf")],
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }
        Err(_) => {
            state.rejected.fetch_add(1, Ordering::Relaxed);
            (
                StatusCode::BAD_REQUEST,
                [(CONTENT_TYPE, "text/plain")],
                Vec::new(),
            )
        }
    }
}
