//! Start-up: database (schema, seed), payment stub, HTTP server.

use std::{error::Error, fmt, net::SocketAddr, path::PathBuf, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::info;

use crate::{
    db::Db,
    http::{
        router,
        server::{self, Limits, Shutdown},
        AppState, TokenTable,
    },
    outbox::{OutboxSignal, Worker},
    payment::{PaymentClient, Stub},
    queue::Queue,
    service::OrderService,
};

/// What to start. Its `Debug` shows the database URL with its password redacted.
#[derive(Clone)]
pub struct Config {
    /// `sqlite://...` or `postgres://...`.
    pub database_url: String,
    /// Where the order service listens (port 0 for any free port).
    pub listen: SocketAddr,
    /// Bearer tokens and their tenants.
    pub tokens: TokenTable,
    /// What clients may send, and how slowly.
    pub limits: Limits,
    /// How long each step of the shutdown may take before it is reported as failed (and its
    /// task aborted). The order server's step takes at least what a request may still take:
    /// the head's grace ([`SHUTDOWN_HEAD_GRACE`](crate::http::server::SHUTDOWN_HEAD_GRACE))
    /// plus [`Limits::request_timeout`] and [`Limits::write_timeout`], and a second.
    pub shutdown_step_timeout: Duration,
    /// The payment provider's base URL; `None` starts the in-process stub.
    pub payment_url: Option<String>,
    /// How old a `pending` order must be before the resolver decides it (longer than a
    /// request may take).
    pub resolve_after: Duration,
    /// How long one resolver pass goes on asking the provider about pending orders; the call
    /// in progress then ends the pass (a call is never cut off; each has its own 10 s
    /// timeout).
    pub resolve_budget: Duration,
    /// Whether to run the outbox worker (off only in tests of a restart before delivery).
    pub deliver_outbox: bool,
    /// Where the payment stub's spans go (its own `service.name`); `None`: OpenTelemetry's
    /// global provider, like the order service's own spans.
    pub telemetry: Option<crate::telemetry::Telemetry>,
    /// The message queue: the in-process channel (default) or a broker (`--queue URL`).
    pub queue: crate::queue::QueueUrl,
}

/// A running service.
#[derive(Debug)]
pub struct RunningService {
    /// The order service's address.
    pub addr: SocketAddr,
    /// The payment stub's address (started even when [`Config::payment_url`] names another
    /// provider).
    pub payment_addr: SocketAddr,
    /// The shared state (database, service, outbox signal, queue).
    pub state: AppState,
    /// The in-process payment stub (its charges, for tests).
    pub payment_stub: Stub,
    orders_shutdown: Shutdown,
    payment_shutdown: Shutdown,
    worker_shutdown: Shutdown,
    orders_server: JoinHandle<()>,
    worker: JoinHandle<()>,
    payment_server: JoinHandle<()>,
    consumer: JoinHandle<()>,
    step_timeout: Duration,
    /// The order server's step: at least what a request may take once the shutdown began (its
    /// head's grace, then the request timeout), so that no request in flight is cut short.
    orders_step_timeout: Duration,
}

/// A shutdown step that did not finish in time (or whose task failed): nothing was left
/// waiting silently.
#[derive(Debug)]
pub struct ShutdownError {
    /// The step.
    pub step: &'static str,
    /// What went wrong.
    pub reason: String,
}

/// The seeded catalogue, per tenant: `(sku, name, stock, price in cents)`.
pub const CATALOGUE: [(&str, &str, i64, i64); 3] = [
    ("sku-apple", "Apple", 1_000_000, 120),
    ("sku-pear", "Pear", 1_000_000, 95),
    ("sku-limited", "Limited edition", 5, 9_999),
];

// ===== impl Config =====

impl Config {
    /// [`Config::from_vars`] over the process environment.
    pub fn from_env() -> Config {
        Config::from_vars(|name| std::env::var(name).ok())
    }

    /// `DATABASE_URL` if set and not empty, else the embedded SQLite file; 127.0.0.1:3000;
    /// the demo tokens; the default [`Limits`]; 30 s per shutdown step.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Config {
        Config {
            database_url: var("DATABASE_URL")
                .filter(|url| !url.is_empty())
                .unwrap_or_else(default_sqlite_url),
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            tokens: TokenTable::demo(),
            limits: Limits::default(),
            shutdown_step_timeout: Duration::from_secs(30),
            payment_url: None,
            resolve_after: Duration::from_secs(60),
            resolve_budget: Duration::from_secs(5),
            deliver_outbox: true,
            telemetry: None,
            queue: crate::queue::QueueUrl::InProcess,
        }
    }

    /// The same configuration listening on any free port of 127.0.0.1 (tests, the demo).
    pub fn local(database_url: &str) -> Config {
        Config {
            database_url: database_url.to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..Config::from_vars(|_| None)
        }
    }
}

/// `sqlite://<temp dir>/order-service/order-service.db?mode=rwc` (the directory is created).
pub fn default_sqlite_url() -> String {
    let dir = std::env::temp_dir().join("order-service");
    let _ = std::fs::create_dir_all(&dir);
    sqlite_url(&dir.join("order-service.db"))
}

/// A `sqlite://` URL that creates the file at `path` if needed.
pub fn sqlite_url(path: &std::path::Path) -> String {
    format!("sqlite://{}?mode=rwc", PathBuf::from(path).display())
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("listen", &self.listen)
            .field("tokens", &self.tokens)
            .field("limits", &self.limits)
            .field("shutdown_step_timeout", &self.shutdown_step_timeout)
            .field("payment_url", &self.payment_url.as_deref().map(redact_url))
            .field("resolve_after", &self.resolve_after)
            .field("resolve_budget", &self.resolve_budget)
            .field("deliver_outbox", &self.deliver_outbox)
            .finish()
    }
}

/// `url` with its password, if any, replaced by `***`: in the user info
/// (`postgres://user:secret@host`) and in `password=` / `sslpassword=` query parameters. Safe
/// to log.
pub fn redact_url(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (url, None),
    };
    let mut out = match head.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _password)) => format!("{user}:***@{host}"),
                    None => format!("{userinfo}@{host}"),
                },
                None => authority.to_owned(),
            };
            format!("{scheme}://{authority}{path}")
        }
        None => head.to_owned(),
    };
    if let Some(query) = query {
        out.push('?');
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                // Compared as the driver reads it: percent-decoded (`passw%6Frd` is `password`).
                Some((key, _))
                    if crate::db::postgres::percent_decode(key)
                        .eq_ignore_ascii_case("password")
                        || crate::db::postgres::percent_decode(key)
                            .eq_ignore_ascii_case("sslpassword") =>
                {
                    format!("{key}=***")
                }
                _ => param.to_owned(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    out
}

/// Connects to the database, creates and seeds it, starts the payment stub and the service.
///
/// # Errors
/// When the database cannot be reached or prepared, or a port cannot be bound.
pub async fn start(config: Config) -> Result<RunningService, Box<dyn Error + Send + Sync>> {
    // OpenTelemetry's own "current context" follows contextflow spawns too.
    contextflow_otel::carry_context();
    let db = Db::connect(&config.database_url).await?;
    seed(&db, &config.tokens).await?;

    let payment_shutdown = Shutdown::new();
    let payment_stub = Stub::new();
    let payment_listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let payment_addr = payment_listener.local_addr()?;
    let payment_router = match &config.telemetry {
        Some(telemetry) => payment_stub.router_with_tracer(telemetry.payment_tracer()),
        None => payment_stub.router(),
    };
    let payment_server = server::serve(
        "payment",
        payment_listener,
        payment_router,
        config.limits,
        payment_shutdown.clone(),
    );

    let payment_url = config
        .payment_url
        .clone()
        .unwrap_or_else(|| format!("http://{payment_addr}"));
    let payments = PaymentClient::new(&payment_url);
    // A queue of this process's own on a broker (deleted with its consumer; a Redis stream
    // expires ten minutes after its consumer stopped).
    let queue_name = format!(
        "order-service.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let (queue, consumer) = Queue::open(&config.queue, &queue_name, 1024).await?;
    let signal = OutboxSignal::new();
    let service = OrderService::new(&db, payments, signal.clone());
    let worker_shutdown = Shutdown::new();
    let worker = if config.deliver_outbox {
        Worker {
            db: db.clone(),
            queue: queue.clone(),
            service: service.clone(),
            resolve_after: config.resolve_after,
            resolve_budget: config.resolve_budget,
            shutdown: worker_shutdown.clone(),
        }
        .start(signal.clone())
    } else {
        contextflow::spawn_without_context(async {})
    };
    let state = AppState {
        service,
        outbox: signal,
        queue,
        db,
    };
    let orders_shutdown = Shutdown::new();
    let listener = TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let orders_server = server::serve(
        "orders",
        listener,
        router(state.clone(), config.tokens.clone(), config.limits),
        config.limits,
        orders_shutdown.clone(),
    );
    info!(%addr, %payment_addr, backend = ?state.db.backend(), "order service started");
    Ok(RunningService {
        addr,
        payment_addr,
        state,
        payment_stub,
        orders_shutdown,
        payment_shutdown,
        worker_shutdown,
        orders_server,
        worker,
        payment_server,
        consumer,
        step_timeout: config.shutdown_step_timeout,
        orders_step_timeout: config.shutdown_step_timeout.max(
            crate::http::server::SHUTDOWN_HEAD_GRACE.min(config.limits.head_timeout)
                + config.limits.request_timeout
                + config.limits.write_timeout
                + Duration::from_secs(1),
        ),
    })
}

impl RunningService {
    /// Shuts down in dependency order, logging each step: stop accepting orders and finish
    /// the requests in flight; finish deciding the recorded orders whose request was cut off;
    /// let the outbox worker deliver what is left and stop; drain the
    /// queue; then stop the payment stub (in-flight orders and the resolver still needed it)
    /// and the queue consumer; last, close the database connections.
    ///
    /// # Errors
    /// A step that does not finish within the configured time, or whose task failed: the
    /// remaining steps still run, and the first failure is returned.
    pub async fn shutdown(self) -> Result<(), ShutdownError> {
        let limit = self.step_timeout;
        let mut first_error = None;
        info!("shutdown: stop accepting orders, finish the requests in flight");
        self.orders_shutdown.begin();
        record(
            &mut first_error,
            step_task("order server", self.orders_step_timeout, self.orders_server).await,
        );
        // Recorded orders whose request was cut off are still being charged and decided.
        info!("shutdown: finishing the orders still being decided");
        let service = self.state.service.clone();
        let settled = async move {
            service.settled().await;
            Ok::<(), tokio::task::JoinError>(())
        };
        let result = step("orders being decided", limit, settled).await;
        if result.is_err() {
            // Past the step's time: stopped, their orders stay pending for the resolver.
            self.state.service.abandon_settling();
        }
        record(&mut first_error, result);
        info!("shutdown: draining the outbox and queued messages");
        self.worker_shutdown.begin();
        record(
            &mut first_error,
            step_task("outbox worker", limit, self.worker).await,
        );
        let queue = self.state.queue.clone();
        let drain = async move {
            queue.wait_idle().await;
            Ok::<(), tokio::task::JoinError>(())
        };
        record(&mut first_error, step("queue", limit, drain).await);
        info!("shutdown: stopping the payment stub");
        self.payment_shutdown.begin();
        record(
            &mut first_error,
            step_task("payment stub", limit, self.payment_server).await,
        );
        self.consumer.abort();
        // Last, the database: every step above may still have used it.
        info!("shutdown: closing the database connections");
        let db = self.state.db.clone();
        let close = async move {
            db.close().await;
            Ok::<(), tokio::task::JoinError>(())
        };
        record(&mut first_error, step("database", limit, close).await);
        match first_error {
            None => {
                info!("shutdown: complete");
                Ok(())
            }
            Some(err) => {
                tracing::error!(step = err.step, reason = %err.reason, "shutdown: step failed");
                Err(err)
            }
        }
    }
}

impl RunningService {
    /// Stops everything at once, delivering nothing more: what a crash leaves behind (tests of
    /// recovery after a restart).
    pub async fn crash(self) {
        // The servers first: a request must not get the answer that stopping its order's
        // decision would give it (a crash answers nothing).
        let service = self.state.service.clone();
        for task in [
            self.orders_server,
            self.worker,
            self.payment_server,
            self.consumer,
        ] {
            task.abort();
            let _ = task.await;
        }
        service.abandon_settling();
    }
}

/// How long a shutdown step's aborted task is waited for.
const ABORT_WAIT: Duration = Duration::from_secs(5);

/// Waits for a task's shutdown step, at most `limit`; a task still running then is aborted
/// (and waited for), so that the steps after it (the payment stub, the database) are not
/// pulled from under it while it runs.
async fn step_task(
    name: &'static str,
    limit: Duration,
    mut task: JoinHandle<()>,
) -> Result<(), ShutdownError> {
    let result = step(name, limit, &mut task).await;
    if result.is_err() && !task.is_finished() {
        tracing::warn!(
            step = name,
            "shutdown: step not finished in time: its task is aborted"
        );
        task.abort();
        // An aborted task stops at its next await; one stuck in blocking code does not, and
        // the shutdown goes on without it.
        let _ = tokio::time::timeout(ABORT_WAIT, task).await;
    }
    result
}

/// Waits for one shutdown step, at most `limit`.
async fn step<F>(name: &'static str, limit: Duration, fut: F) -> Result<(), ShutdownError>
where
    F: std::future::Future<Output = Result<(), tokio::task::JoinError>>,
{
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(ShutdownError {
            step: name,
            reason: format!("task failed: {err}"),
        }),
        Err(_) => Err(ShutdownError {
            step: name,
            reason: format!("not finished after {} ms", limit.as_millis()),
        }),
    }
}

fn record(first: &mut Option<ShutdownError>, result: Result<(), ShutdownError>) {
    if let Err(err) = result {
        first.get_or_insert(err);
    }
}

impl fmt::Display for ShutdownError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shutdown step {:?} failed: {}", self.step, self.reason)
    }
}

impl Error for ShutdownError {}

/// Seeds every tenant's catalogue, through the admin pool (start-up work, no request).
async fn seed(db: &Db, tokens: &TokenTable) -> Result<(), sqlx::Error> {
    for tenant in tokens.tenants() {
        db.seed(&tenant, &CATALOGUE).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn config_reads_database_url_and_falls_back_to_sqlite() {
        let pg = "postgres://u:p@h/db";
        let config = Config::from_vars(|name| (name == "DATABASE_URL").then(|| pg.to_owned()));
        assert_eq!(config.database_url, pg);
        assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 3000)));
        assert_eq!(config.limits, Limits::default());
        for unset in [None, Some(String::new())] {
            let config = Config::from_vars(|_| unset.clone());
            assert!(config.database_url.starts_with("sqlite://"), "{config:?}");
            assert!(config.database_url.ends_with("order-service.db?mode=rwc"));
        }
    }

    #[test]
    fn redaction_examples() {
        for (url, want) in [
            (
                "postgres://postgres@127.0.0.1:5432/test",
                "postgres://postgres@127.0.0.1:5432/test",
            ),
            (
                "postgres://app:s3cr3t@db:5432/orders",
                "postgres://app:***@db:5432/orders",
            ),
            ("postgres://app:p@ss@db/x", "postgres://app:***@db/x"),
            (
                "postgres://db/x?user=a&password=hunter2&sslmode=require",
                "postgres://db/x?user=a&password=***&sslmode=require",
            ),
            (
                "postgres://db/x?sslpassword=k",
                "postgres://db/x?sslpassword=***",
            ),
            // The driver decodes the key: so does the redaction.
            (
                "postgres://db/x?passw%6Frd=hunter2&PASSWORD=x",
                "postgres://db/x?passw%6Frd=***&PASSWORD=***",
            ),
            ("sqlite:///tmp/o.db?mode=rwc", "sqlite:///tmp/o.db?mode=rwc"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    proptest! {
        /// A password, in the user info or a query parameter, never survives redaction.
        #[test]
        fn password_never_survives(
            user in "[a-z]{1,8}",
            password in "[A-Za-z0-9@:!%*]{1,16}",
            host in "[a-z]{1,8}(:[0-9]{2,5})?",
            in_query in any::<bool>(),
        ) {
            let secret = format!("SECRET{password}");
            let url = if in_query {
                format!("postgres://{user}@{host}/db?password={secret}&sslmode=disable")
            } else {
                format!("postgres://{user}:{secret}@{host}/db?sslmode=disable")
            };
            let redacted = redact_url(&url);
            prop_assert!(!redacted.contains(&secret), "{} -> {}", url, redacted);
            prop_assert!(redacted.contains(&host) && redacted.contains(&user), "{}", redacted);
        }
    }
}
