//! A trace-context validation service: the contract W3C trace-context test harnesses drive.
//!
//! `POST /test` takes a JSON array of `{"url": ..., "arguments": [...]}`. For each element, in
//! order, the service sends `POST url` with `arguments` as the JSON body, carrying the trace
//! context of the incoming request (through [`PropagateContextLayer`] on the way in and
//! [`InjectContextMiddleware`] on the way out), then answers 200. Spans are real: an
//! OpenTelemetry SDK tracer provider (no exporter) with contextflow's secure id generator, a
//! server span per request and a client span per callback.
//!
//! Run with: `cargo run -p contextflow-http --example trace-context-service -- --port 8080`
//! (`--host` picks the address to listen on; the default is 127.0.0.1).

use std::net::SocketAddr;

use axum::{extract::State, http::StatusCode, routing::post, Json, Router};
use contextflow_http::{InjectContextMiddleware, PropagateContextLayer};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use serde::Deserialize;

/// One call the harness asks for.
#[derive(Debug, Deserialize)]
pub(crate) struct Case {
    /// Where to send it.
    pub(crate) url: String,
    /// The JSON body to send.
    #[serde(default)]
    pub(crate) arguments: serde_json::Value,
}

/// The service's tracer: an SDK provider with no exporter and secure ids.
pub(crate) fn tracer() -> SdkTracer {
    SdkTracerProvider::builder()
        .with_id_generator(contextflow_otel::SecureIdGenerator::default())
        .build()
        .tracer("trace-context-service")
}

/// The service's router: `POST /test` behind the server layer, calling out through `client`.
pub(crate) fn app(client: ClientWithMiddleware, tracer: SdkTracer) -> Router {
    Router::new()
        .route("/test", post(run_cases))
        .with_state(client)
        .layer(PropagateContextLayer::new().with_tracer(tracer))
}

/// A client that carries the current context on every request, with a client span each.
pub(crate) fn client(tracer: SdkTracer) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(InjectContextMiddleware::new().with_tracer(tracer))
        .build()
}

async fn run_cases(
    State(client): State<ClientWithMiddleware>,
    Json(cases): Json<Vec<Case>>,
) -> StatusCode {
    for case in cases {
        // A callback that fails does not stop the others: the harness judges what arrived.
        let sent = client.post(&case.url).json(&case.arguments).send().await;
        if let Err(err) = sent {
            tracing::debug!(error = %err, "callback failed");
        }
    }
    StatusCode::OK
}

/// `--port N` (default 8080) and `--host ADDR` (default 127.0.0.1).
fn parse_args() -> Result<SocketAddr, String> {
    let mut port = 8080u16;
    let mut host = String::from("127.0.0.1");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--port" => port = value.parse().map_err(|e| format!("--port: {e}"))?,
            "--host" => host = value,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    format!("{host}:{port}")
        .parse()
        .map_err(|e| format!("address: {e}"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = parse_args()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let tracer = tracer();
    axum::serve(listener, app(client(tracer.clone()), tracer)).await?;
    Ok(())
}
