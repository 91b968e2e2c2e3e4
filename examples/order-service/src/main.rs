//! Run with: cargo run -p order-service
//!
//! - `cargo run -p order-service [-- --json] [--addr 127.0.0.1:3000]`: serves on an embedded
//!   SQLite file (or `DATABASE_URL=postgres://...`).
//! - `cargo run -p order-service -- demo [--orders N] [--concurrency C] [--json]`: fires N
//!   orders, C at a time, at an in-process instance and checks every log line and every span.
//! - `OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318`: serving exports spans over OTLP/HTTP.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, process::ExitCode};

use order_service::{
    app::{self, Config},
    demo::{self, DemoOptions},
    logging::{self, LogFormat},
    queue::QueueUrl,
    telemetry::Telemetry,
};

const USAGE: &str =
    "usage: order-service [--json] [--addr ADDR] [--queue URL]   (DATABASE_URL: postgres://... or sqlite://...)
       order-service demo [--queue URL] [--orders N] [--concurrency C] [--json] [--log-file PATH] [--trace-file PATH]
       (OTEL_EXPORTER_OTLP_ENDPOINT=http://host:4318: serving exports spans over OTLP/HTTP)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = if args.first().map(String::as_str) == Some("demo") {
        parse_demo(&args[1..]).and_then(|opts| runtime.block_on(run_demo(opts)))
    } else {
        parse_serve(&args).and_then(|(config, format)| runtime.block_on(serve(config, format)))
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            if args.iter().any(|a| a == "--json") {
                // With `--json` every line is a JSON record, a fatal error's too.
                let record = serde_json::json!({
                    "level": "ERROR",
                    "fields": { "message": err.to_string() },
                    "target": "order_service",
                });
                eprintln!("{record}");
            } else {
                eprintln!("error: {err}");
            }
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn parse_serve(args: &[String]) -> Result<(Config, LogFormat), BoxError> {
    let mut config = Config::from_env();
    let mut format = LogFormat::Text;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => format = LogFormat::Json,
            "--queue" => {
                let url = args.next().ok_or("--queue needs a URL")?;
                config.queue = QueueUrl::parse(url)?;
            }
            "--addr" => {
                let addr = args.next().ok_or(USAGE)?;
                config.listen = addr
                    .parse::<SocketAddr>()
                    .map_err(|e| format!("--addr {addr}: {e}"))?;
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    Ok((config, format))
}

fn parse_demo(args: &[String]) -> Result<DemoOptions, BoxError> {
    let mut opts = DemoOptions::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<usize, BoxError> {
            let value = args
                .next()
                .ok_or_else(|| format!("{name} needs a number"))?;
            value
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{name} {value:?}: expected a positive number").into())
        };
        match arg.as_str() {
            "--orders" => opts.orders = number("--orders")?,
            "--concurrency" => opts.concurrency = number("--concurrency")?,
            "--json" => opts.format = LogFormat::Json,
            "--queue" => {
                let url = args.next().ok_or("--queue needs a URL")?;
                opts.queue = QueueUrl::parse(url)?;
            }
            "--log-file" => {
                opts.log_file = Some(args.next().ok_or("--log-file needs a path")?.into())
            }
            "--trace-file" => {
                opts.trace_file = Some(args.next().ok_or("--trace-file needs a path")?.into())
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    opts.database_url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty());
    Ok(opts)
}

async fn serve(mut config: Config, format: LogFormat) -> Result<ExitCode, BoxError> {
    logging::init(format, std::io::stdout)?;
    let database = app::redact_url(&config.database_url);
    let telemetry = Telemetry::from_env()?;
    if let Some(telemetry) = &telemetry {
        telemetry.install_global();
        config.telemetry = Some(telemetry.clone());
        tracing::info!(?telemetry, "exporting spans over OTLP/HTTP");
    }
    // Registered before the service accepts connections: a signal that comes at once shuts
    // it down gracefully too (unregistered, SIGTERM would end the process on the spot).
    let stop = StopSignal::register()?;
    let service = app::start(config).await?;
    let addr = service.addr;
    // The banner is part of the log stream: with `--json` it is JSON records like every line.
    tracing::info!(
        url = %format!("http://{addr}"),
        %database,
        payment_stub = %format!("http://{}", service.payment_addr),
        "order-service listening"
    );
    if format == LogFormat::Text {
        println!("order-service listening on http://{addr}");
        println!("  database: {database}");
        println!("  payment stub: http://{}", service.payment_addr);
        println!(
            "  try: curl -s -X POST http://{addr}/orders -H 'Authorization: Bearer token-acme' \\"
        );
        println!("         -H 'Content-Type: application/json' \\");
        println!("         -d '{{\"reference\":\"r-1\",\"items\":[{{\"sku\":\"sku-apple\",\"quantity\":2}}]}}'");
        println!("       curl -s http://{addr}/orders/1 -H 'Authorization: Bearer token-acme'");
        println!("  Ctrl-C to stop");
    }
    if let Err(error) = stop.recv().await {
        tracing::error!(%error, "waiting for a stop signal failed: shutting down");
    }
    tracing::info!("shutdown: signal received");
    let stopped = service.shutdown().await;
    if let Some(telemetry) = telemetry {
        for error in telemetry.shutdown().await {
            tracing::warn!(%error, "span export failed");
        }
    }
    stopped?;
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C, or SIGTERM on Unix.
struct StopSignal {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignal {
    /// Takes the signals over from their default action (ending the process).
    fn register() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(StopSignal {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(StopSignal {})
        }
    }

    /// Waits for one of them.
    async fn recv(mut self) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => Ok(()),
                _ = self.terminate.recv() => Ok(()),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = &mut self;
            tokio::signal::ctrl_c().await
        }
    }
}

async fn run_demo(opts: DemoOptions) -> Result<ExitCode, BoxError> {
    let report = demo::run(opts).await?;
    print!("{report}");
    Ok(if report.is_correct() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
