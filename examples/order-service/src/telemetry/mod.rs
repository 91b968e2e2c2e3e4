//! OpenTelemetry export: the spans of the order service, the payment stub and the queue
//! consumer, sent over OTLP/HTTP (protobuf) by `opentelemetry-otlp`.
//!
//! - Serving: with `OTEL_EXPORTER_OTLP_ENDPOINT` set (`http://127.0.0.1:4318`, the collector's
//!   OTLP/HTTP port), [`Telemetry::from_env`] makes the tracer providers and the service
//!   installs the order service's as OpenTelemetry's global provider, so `contextflow-http`'s
//!   server and client layers and the queue start real spans. The other `OTEL_EXPORTER_OTLP_*`
//!   variables (headers, timeout, `..._TRACES_ENDPOINT`) apply as `opentelemetry-otlp` reads
//!   them.
//! - The demo and the tests: [`Telemetry::otlp`] exports to an in-process [`Receiver`], which
//!   decodes the real protobuf, so the checks look at what a collector would have received.
//!   The demo uses [`Telemetry::otlp_and_env`]: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, its
//!   spans also go to that collector.
//!
//! Each role is a process of its own in a real deployment, so each has its own provider and
//! `service.name`: [`ORDER_SERVICE`], [`PAYMENT_SERVICE`] (the in-process payment stub) and
//! [`DEMO_CLIENT`] (the demo's load generator). Span and trace ids come from
//! `contextflow_otel::SecureIdGenerator` (a CSPRNG).

pub mod receiver;

use std::{fmt, time::Duration};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::{
    trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider},
    Resource,
};

pub use self::receiver::{Receiver, SpanRecord};

/// The order service's `service.name`.
pub const ORDER_SERVICE: &str = "order-service";
/// The payment stub's `service.name`.
pub const PAYMENT_SERVICE: &str = "payment-stub";
/// The demo load generator's `service.name`.
pub const DEMO_CLIENT: &str = "order-demo-client";

/// The environment variable that turns export on when serving.
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The tracer providers of the roles the application plays, each exporting over OTLP/HTTP.
/// Clones share the providers.
///
/// ```
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// use order_service::telemetry::{Receiver, Telemetry};
/// let receiver = Receiver::start().await?;
/// let telemetry = Telemetry::otlp(Some(&receiver.endpoint()))?;
/// telemetry.install_global();
/// // ... serve ...
/// telemetry.flush().await;
/// assert!(receiver.spans().is_empty(), "nothing happened");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Telemetry {
    endpoint: Option<String>,
    orders: SdkTracerProvider,
    payment: SdkTracerProvider,
    client: SdkTracerProvider,
}

// ===== impl Telemetry =====

impl Telemetry {
    /// Providers exporting where [`ENDPOINT_VAR`] says, or `None` when it is unset or empty.
    ///
    /// # Errors
    /// When the exporter cannot be built from the variables (a malformed endpoint).
    pub fn from_env() -> Result<Option<Telemetry>, BoxError> {
        match std::env::var(ENDPOINT_VAR) {
            Ok(endpoint) if !endpoint.trim().is_empty() => Telemetry::otlp(None).map(Some),
            _ => Ok(None),
        }
    }

    /// Providers exporting over OTLP/HTTP protobuf to `traces_url` (the whole URL,
    /// `http://host:port/v1/traces`), or, with `None`, where the `OTEL_EXPORTER_OTLP_*`
    /// variables say.
    ///
    /// # Errors
    /// When an exporter cannot be built (a malformed endpoint).
    pub fn otlp(traces_url: Option<&str>) -> Result<Telemetry, BoxError> {
        Telemetry::to(&[traces_url])
    }

    /// Providers exporting to `traces_url` and, when [`ENDPOINT_VAR`] is set, also where the
    /// `OTEL_EXPORTER_OTLP_*` variables say (the demo: its receiver checks the spans, a
    /// collector shows them).
    ///
    /// # Errors
    /// When an exporter cannot be built (a malformed endpoint).
    pub fn otlp_and_env(traces_url: &str) -> Result<Telemetry, BoxError> {
        let env_set = std::env::var(ENDPOINT_VAR).is_ok_and(|v| !v.trim().is_empty());
        if env_set {
            Telemetry::to(&[Some(traces_url), None])
        } else {
            Telemetry::to(&[Some(traces_url)])
        }
    }

    fn to(targets: &[Option<&str>]) -> Result<Telemetry, BoxError> {
        Ok(Telemetry {
            endpoint: targets.first().copied().flatten().map(str::to_owned),
            orders: provider(ORDER_SERVICE, targets)?,
            payment: provider(PAYMENT_SERVICE, targets)?,
            client: provider(DEMO_CLIENT, targets)?,
        })
    }

    /// Makes the order service's provider OpenTelemetry's global one: `contextflow-http`'s
    /// layers and the queue start their spans with it.
    pub fn install_global(&self) {
        opentelemetry::global::set_tracer_provider(self.orders.clone());
    }

    /// A tracer of the payment stub (its own `service.name`).
    pub fn payment_tracer(&self) -> SdkTracer {
        self.payment.tracer("order-service.payment-stub")
    }

    /// A tracer of the demo's load generator (its own `service.name`).
    pub fn client_tracer(&self) -> SdkTracer {
        self.client.tracer("order-service.demo")
    }

    /// Exports every span ended so far and waits until the exporter has sent them (on a
    /// blocking thread: the exporter's HTTP client blocks). Failures are returned as text.
    pub async fn flush(&self) -> Vec<String> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.each(SdkTracerProvider::force_flush))
            .await
            .unwrap_or_else(|err| vec![format!("flush task failed: {err}")])
    }

    /// Flushes and stops the exporters (on a blocking thread). Failures are returned as text.
    pub async fn shutdown(&self) -> Vec<String> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.each(SdkTracerProvider::shutdown))
            .await
            .unwrap_or_else(|err| vec![format!("shutdown task failed: {err}")])
    }

    fn each(
        &self,
        op: impl Fn(&SdkTracerProvider) -> opentelemetry_sdk::error::OTelSdkResult,
    ) -> Vec<String> {
        [
            (ORDER_SERVICE, &self.orders),
            (PAYMENT_SERVICE, &self.payment),
            (DEMO_CLIENT, &self.client),
        ]
        .into_iter()
        .filter_map(|(name, provider)| op(provider).err().map(|err| format!("{name}: {err}")))
        .collect()
    }
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field(
                "endpoint",
                &self.endpoint.as_deref().unwrap_or(ENDPOINT_VAR),
            )
            .finish_non_exhaustive()
    }
}

/// A provider for `service` with a batch exporter over OTLP/HTTP protobuf per target (a URL, or
/// `None` for the environment's). The queue is large enough for a demo run's spans between two
/// exports (a full queue drops spans, which the demo would report as fragmented traces).
fn provider(
    service: &'static str,
    targets: &[Option<&str>],
) -> Result<SdkTracerProvider, BoxError> {
    let mut builder = SdkTracerProvider::builder()
        .with_id_generator(contextflow_otel::SecureIdGenerator::default())
        .with_resource(Resource::builder().with_service_name(service).build());
    for target in targets {
        let mut exporter = SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(Duration::from_secs(10));
        if let Some(url) = target {
            exporter = exporter.with_endpoint(*url);
        }
        let processor = BatchSpanProcessor::builder(exporter.build()?)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(1 << 16)
                    .with_max_export_batch_size(1024)
                    .with_scheduled_delay(Duration::from_millis(200))
                    .build(),
            )
            .build();
        builder = builder.with_span_processor(processor);
    }
    Ok(builder.build())
}
