//! Start-up: database (schema, seed), payment stub, HTTP server.

use std::{error::Error, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    context::TENANT,
    db::{Db, InventoryRepository},
    http::{router, AppState, TokenTable},
    jobs::Jobs,
    payment::{stub_router, PaymentClient},
    queue::Queue,
    service::OrderService,
};

/// What to start.
#[derive(Clone, Debug)]
pub struct Config {
    /// `sqlite://...` or `postgres://...`.
    pub database_url: String,
    /// Where the order service listens (port 0 for any free port).
    pub listen: SocketAddr,
    /// Bearer tokens and their tenants.
    pub tokens: TokenTable,
}

/// A running service.
#[derive(Debug)]
pub struct RunningService {
    /// The order service's address.
    pub addr: SocketAddr,
    /// The payment stub's address.
    pub payment_addr: SocketAddr,
    /// The shared state (database, jobs).
    pub state: AppState,
    shutdown: Arc<Notify>,
    servers: Vec<JoinHandle<std::io::Result<()>>>,
    consumer: JoinHandle<()>,
}

/// The seeded catalogue, per tenant: `(sku, name, stock, price in cents)`.
pub const CATALOGUE: [(&str, &str, i64, i64); 3] = [
    ("sku-apple", "Apple", 1_000_000, 120),
    ("sku-pear", "Pear", 1_000_000, 95),
    ("sku-limited", "Limited edition", 5, 9_999),
];

// ===== impl Config =====

impl Config {
    /// `DATABASE_URL` if set, else the embedded SQLite file; 127.0.0.1:3000; the demo tokens.
    pub fn from_env() -> Config {
        Config {
            database_url: std::env::var("DATABASE_URL").unwrap_or_else(|_| default_sqlite_url()),
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            tokens: TokenTable::demo(),
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

/// Connects to the database, creates and seeds it, starts the payment stub and the service.
///
/// # Errors
/// When the database cannot be reached or prepared, or a port cannot be bound.
pub async fn start(config: Config) -> Result<RunningService, Box<dyn Error + Send + Sync>> {
    // OpenTelemetry's own "current context" follows contextflow spawns too.
    contextflow_otel::carry_context();
    let db = Db::connect(&config.database_url).await?;
    seed(&db, &config.tokens).await?;

    let shutdown = Arc::new(Notify::new());
    let payment_listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let payment_addr = payment_listener.local_addr()?;
    let payment_server = serve(payment_listener, stub_router(), shutdown.clone());

    let payments = PaymentClient::new(&format!("http://{payment_addr}"));
    let (queue, consumer) = Queue::start(1024);
    let state = AppState {
        service: OrderService::new(&db, payments),
        jobs: Jobs::new(&db, queue),
        db,
    };
    let listener = TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let server = serve(
        listener,
        router(state.clone(), config.tokens.clone()),
        shutdown.clone(),
    );
    info!(%addr, %payment_addr, backend = ?state.db.backend(), "order service started");
    Ok(RunningService {
        addr,
        payment_addr,
        state,
        shutdown,
        servers: vec![payment_server, server],
        consumer,
    })
}

impl RunningService {
    /// Stops accepting requests, waits for the servers, for running jobs and queued messages
    /// (30 s at most for all of it), then stops the queue consumer.
    pub async fn shutdown(self) {
        self.shutdown.notify_waiters();
        let drain = async {
            for server in self.servers {
                let _ = server.await;
            }
            self.state.jobs.wait_idle().await;
        };
        if tokio::time::timeout(Duration::from_secs(30), drain)
            .await
            .is_err()
        {
            warn!("shutdown: gave up waiting for requests and jobs after 30 s");
        }
        self.consumer.abort();
    }
}

fn serve(
    listener: TcpListener,
    router: axum::Router,
    shutdown: Arc<Notify>,
) -> JoinHandle<std::io::Result<()>> {
    // Server tasks belong to no request: they start from an empty context.
    contextflow::spawn_without_context(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.notified().await })
            .await
    })
}

/// Seeds every tenant's catalogue, as that tenant (the repository takes it from the context).
async fn seed(db: &Db, tokens: &TokenTable) -> Result<(), crate::db::RepoError> {
    let inventory = InventoryRepository::new(db);
    for tenant in tokens.tenants() {
        TENANT
            .scope(tenant, async {
                for (sku, name, stock, price) in CATALOGUE {
                    inventory.seed(sku, name, stock, price).await?;
                }
                Ok::<_, crate::db::RepoError>(())
            })
            .await?;
    }
    Ok(())
}
