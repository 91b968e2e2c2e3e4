//! The demo: many concurrent orders against an in-process service, then checks of everything
//! it did.
//!
//! Each client request sends its own `x-request-id`, a `traceparent` with a fresh trace id, the
//! token of one of three tenants and an order with its own reference. Every event the service
//! logs is captured as structured data ([`EventCapture`]), and the log stream itself is kept;
//! after the run, each [`Check`] looks at the whole [`Run`]: every event must belong to the
//! request that caused it, every order must have passed each stage exactly once, the log
//! stream must have one well-formed line per event, the database must hold what was
//! promised.
//!
//! The modules, by concern:
//!
//! - [`load`]: the client requests and what each one sent;
//! - `database`: the temporary database (a SQLite file, or a schema on PostgreSQL);
//! - [`check`]: the [`Check`] trait, the [`Run`] it looks at, and the list of checks, where a
//!   new one plugs in; [`attribution`], [`output`], [`milestones`]: the checks;
//! - [`traces`]: every span exported over OTLP to the in-process receiver forms one connected
//!   trace per request;
//! - `tree` and `report`: one request's path as a tree, and the summary;
//! - `progress`: the progress bar.

pub mod attribution;
pub mod check;
mod database;
pub mod load;
pub mod milestones;
pub mod output;
mod progress;
mod report;
pub mod traces;
mod tree;

use std::time::Duration;

pub use self::{
    check::{checks, Check, DatabaseCounts, Phases, Run, StoredOrder, Verdict},
    report::DemoReport,
};
use self::{database::TempDatabase, load::Load};
use crate::{
    app::{self, Config},
    context::{TenantId, TENANT},
    db::OrderRepository,
    http::TokenTable,
    logging::{self, EventCapture, LogFormat, LogSink},
    telemetry::{receiver::to_otlp_json, Receiver, Telemetry},
};

/// What the demo runs.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// How many orders (default 2,000).
    pub orders: usize,
    /// How many requests in flight at most (default 64).
    pub concurrency: usize,
    /// The service's log format.
    pub format: LogFormat,
    /// The database; `None` for a fresh SQLite file. A `postgres://` URL gets a fresh schema.
    /// Either is removed afterwards.
    pub database_url: Option<String>,
    /// Whether to draw a progress bar on stderr.
    pub progress: bool,
    /// Where to save every line of the log stream, if anywhere.
    pub log_file: Option<std::path::PathBuf>,
    /// Where to write every exported span as OTLP JSON, if anywhere.
    pub trace_file: Option<std::path::PathBuf>,
    /// The message queue (default: in-process; `--queue amqp://...` for RabbitMQ, `nats://...`
    /// for NATS, `redis://...` for Redis Streams).
    pub queue: crate::queue::QueueUrl,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            orders: 2_000,
            concurrency: 64,
            format: LogFormat::Text,
            database_url: None,
            progress: true,
            log_file: None,
            trace_file: None,
            queue: crate::queue::QueueUrl::InProcess,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the demo: installs the global subscriber with the event capture, starts the service on
/// a temporary database, fires the orders, waits for the background work, shuts down, and
/// runs every check.
///
/// # Errors
/// When a global `tracing` subscriber is already installed, the database cannot be made, or
/// the service cannot start. A run that starts but fails a check is an `Ok` report that says
/// so ([`DemoReport::is_correct`]).
pub async fn run(opts: DemoOptions) -> Result<DemoReport, BoxError> {
    let capture = EventCapture::new(logging::context_fields());
    let sink = LogSink::new();
    logging::init_captured(opts.format, sink.clone(), &capture)?;
    // Every span goes out over OTLP/HTTP to a receiver in this process, as to a collector.
    let receiver = Receiver::start().await?;
    // With OTEL_EXPORTER_OTLP_ENDPOINT set, to that collector as well.
    let telemetry = Telemetry::otlp_and_env(&receiver.endpoint())?;
    telemetry.install_global();

    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let (database_url, temp) = TempDatabase::create(opts.database_url.as_deref(), &run_id).await?;
    let result = run_on(&opts, &run_id, &database_url, &capture, &telemetry).await;
    if let Some(temp) = temp {
        temp.remove().await?;
    }
    let mut trace_errors = telemetry.shutdown().await;
    let (load, phases, database, backend) = result?;

    let output = sink.take();
    if let Some(path) = &opts.log_file {
        let mut text = output.join("\n");
        text.push('\n');
        std::fs::write(path, text)?;
    }
    if receiver.rejected() > 0 {
        trace_errors.push(format!(
            "the receiver refused {} export requests",
            receiver.rejected()
        ));
    }
    if let Some(path) = &opts.trace_file {
        let mut json = to_otlp_json(&receiver.traces_data())?;
        json.push('\n');
        std::fs::write(path, json)?;
    }
    let run = Run {
        run_id,
        load,
        events: capture.take(),
        spans: capture.take_spans(),
        phases,
        output,
        format: opts.format,
        database,
        traces: receiver.spans(),
        trace_errors,
    };
    let verdicts = checks().iter().map(|check| check.check(&run)).collect();
    Ok(DemoReport::new(&run, &opts, backend, verdicts))
}

/// Start-up, load, drain, database counts, shutdown.
async fn run_on(
    opts: &DemoOptions,
    run_id: &str,
    database_url: &str,
    capture: &EventCapture,
    telemetry: &Telemetry,
) -> Result<(Load, Phases, DatabaseCounts, crate::db::Backend), BoxError> {
    let service = app::start(Config {
        telemetry: Some(telemetry.clone()),
        queue: opts.queue.clone(),
        ..Config::local(database_url)
    })
    .await?;
    let backend = service.state.db.backend();
    let mut phases = Phases {
        load_start: capture.len(),
        shutdown_start: 0,
    };
    let load = load::run(
        service.addr,
        &telemetry.client_tracer(),
        run_id,
        opts.orders,
        opts.concurrency,
        opts.progress,
    )
    .await?;

    // The outbox worker and the queue consumer log after the responses went out.
    let delivered = async {
        service.state.outbox.wait_delivered().await;
        service.state.queue.wait_idle().await;
    };
    if tokio::time::timeout(Duration::from_secs(60), delivered)
        .await
        .is_err()
    {
        return Err("outbox or queue not drained 60 s after the load".into());
    }
    let orders = OrderRepository::new(&service.state.db);
    let mut database = DatabaseCounts::default();
    for tenant in TokenTable::demo().tenants() {
        let name = tenant.to_string();
        let (paid, confirmed, repeated) = TENANT
            .scope(tenant, orders.count_with_prefix(&format!("ord-{run_id}-")))
            .await?;
        database.paid += paid;
        database.confirmed += confirmed;
        database.repeated += repeated;
        database
            .by_tenant
            .insert(name.clone(), (paid, confirmed, repeated));
        let rows = TENANT
            .scope(
                TenantId::new(name.clone()),
                orders.list_with_prefix(&format!("ord-{run_id}-")),
            )
            .await?;
        for (reference, status, confirmation_sent) in rows {
            let order = database.orders.entry(reference).or_default();
            order.tenants.push(name.clone());
            order.status = status;
            order.confirmation_sent = confirmation_sent;
        }
    }
    database.all_tenants = orders
        .count_all_tenants_with_prefix(&format!("ord-{run_id}-"))
        .await?;
    phases.shutdown_start = capture.len();
    service.shutdown().await?;
    Ok((load, phases, database, backend))
}
