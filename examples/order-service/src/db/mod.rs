//! The database: a [`TxPool`] (from `contextflow-sqlx`) over sqlx's `Any` driver, so the same
//! repositories run on SQLite and PostgreSQL.
//!
//! Repositories never take a transaction or a tenant parameter: [`Db::transaction`] binds the
//! transaction to the context and every repository query joins it; the tenant comes from
//! [`crate::context::TENANT`] and is part of every `WHERE` clause.

mod inventory;
mod orders;
mod outbox;

use std::future::Future;

use contextflow_sqlx::TxPool;
use sqlx::{any::AnyPoolOptions, Any};
use tracing::{debug, info, warn, Instrument as _};

pub use self::{
    inventory::{InventoryRepository, StockItem},
    orders::{Order, OrderItem, OrderRepository, PendingOrder},
    outbox::{OutboxRepository, OutboxRow},
};
use crate::context::{self, TenantId};

/// Which database the URL named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A repository call outside an authenticated context, or a database error.
#[derive(Debug)]
pub enum RepoError {
    /// No tenant in the context: a repository was called outside authenticated code.
    NoTenant,
    /// The database failed.
    Sqlx(sqlx::Error),
}

/// The service's database handle: cheap to clone, shared by all repositories.
#[derive(Clone, Debug)]
pub struct Db {
    pool: TxPool<Any>,
    backend: Backend,
}

// ===== impl Db =====

impl Db {
    /// Connects to `url` (`sqlite://...` or `postgres://...`) and creates the schema if it is
    /// missing.
    ///
    /// # Errors
    /// When the URL names another database, or connecting or creating the schema fails.
    pub async fn connect(url: &str) -> Result<Db, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(sqlx::Error::Configuration(
                format!(
                    "unsupported database url scheme {:?} (sqlite:// or postgres://)",
                    url.split(':').next().unwrap_or_default()
                )
                .into(),
            ));
        };
        // SQLite has one writer at a time, and `TxPool` begins transactions with a plain
        // (deferred) `BEGIN`: one connection queues writers fairly in the pool instead of in
        // SQLite's sleeping busy handler.
        let max_connections = match backend {
            Backend::Sqlite => 1,
            Backend::Postgres => 16,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            // No ping before each use: it is a round trip per transaction (two per order), and a
            // connection that broke fails its first statement, which fails the request.
            .test_before_acquire(false)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL (sqlx's default) with NORMAL sync: durable against crashes of
                        // the process, one fsync per checkpoint rather than per commit.
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        let db = Db {
            pool: TxPool::new(pool),
            backend,
        };
        db.create_schema().await?;
        Ok(db)
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The transaction-aware pool the repositories use.
    pub fn pool(&self) -> &TxPool<Any> {
        &self.pool
    }

    /// Runs `f` in one transaction that every repository call inside it joins: committed when
    /// it returns `Ok`, rolled back on `Err`, on panic and when the request is dropped.
    ///
    /// # Errors
    /// The block's error, or the database's when beginning or committing fails.
    pub async fn transaction<F, Fut, T, E>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<sqlx::Error> + std::fmt::Display,
    {
        let span = tracing::info_span!("transaction");
        async {
            debug!("transaction begin");
            let result = self.pool.transaction(f).await;
            match &result {
                Ok(_) => info!("transaction committed"),
                Err(err) => warn!(error = %err, "transaction rolled back"),
            }
            result
        }
        .instrument(span)
        .await
    }

    /// Creates the tables if they do not exist.
    async fn create_schema(&self) -> Result<(), sqlx::Error> {
        let id_column = match self.backend {
            Backend::Sqlite => "id INTEGER PRIMARY KEY AUTOINCREMENT",
            Backend::Postgres => "id BIGSERIAL PRIMARY KEY",
        };
        let statements = [
            "CREATE TABLE IF NOT EXISTS inventory (
                tenant_id TEXT NOT NULL,
                sku TEXT NOT NULL,
                name TEXT NOT NULL,
                stock BIGINT NOT NULL CHECK (stock >= 0),
                price_cents BIGINT NOT NULL,
                PRIMARY KEY (tenant_id, sku)
            )"
            .to_string(),
            format!(
                "CREATE TABLE IF NOT EXISTS orders (
                    {id_column},
                    tenant_id TEXT NOT NULL,
                    reference TEXT NOT NULL,
                    status TEXT NOT NULL,
                    total_cents BIGINT NOT NULL,
                    payment_id TEXT,
                    confirmation_sent BIGINT NOT NULL DEFAULT 0,
                    request_id TEXT,
                    traceparent TEXT,
                    created_ms BIGINT NOT NULL DEFAULT 0
                )"
            ),
            // A client's reference names one order per tenant: a retry finds the first one.
            "CREATE UNIQUE INDEX IF NOT EXISTS orders_reference ON orders (tenant_id, reference)"
                .to_string(),
            "CREATE INDEX IF NOT EXISTS orders_pending ON orders (status, created_ms)".to_string(),
            format!(
                "CREATE TABLE IF NOT EXISTS outbox (
                    {id_column},
                    tenant_id TEXT NOT NULL,
                    order_id BIGINT NOT NULL REFERENCES orders (id),
                    topic TEXT NOT NULL,
                    payload TEXT NOT NULL,
                    request_id TEXT,
                    traceparent TEXT,
                    delivered BIGINT NOT NULL DEFAULT 0
                )"
            ),
            "CREATE INDEX IF NOT EXISTS outbox_undelivered ON outbox (delivered, id)".to_string(),
            "CREATE TABLE IF NOT EXISTS order_items (
                order_id BIGINT NOT NULL REFERENCES orders (id),
                tenant_id TEXT NOT NULL,
                sku TEXT NOT NULL,
                quantity BIGINT NOT NULL,
                price_cents BIGINT NOT NULL
            )"
            .to_string(),
            "CREATE INDEX IF NOT EXISTS order_items_by_order ON order_items (tenant_id, order_id)"
                .to_string(),
        ];
        for statement in statements {
            sqlx::query(&statement).execute(self.pool.pool()).await?;
        }
        Ok(())
    }
}

// ===== impl RepoError =====

impl From<sqlx::Error> for RepoError {
    fn from(err: sqlx::Error) -> Self {
        RepoError::Sqlx(err)
    }
}

impl std::fmt::Display for RepoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepoError::NoTenant => f.write_str("repository called without an authenticated tenant"),
            RepoError::Sqlx(err) => write!(f, "database error: {err}"),
        }
    }
}

impl std::error::Error for RepoError {}

impl RepoError {
    /// Whether this is a unique-constraint violation (a second order with the same reference).
    pub fn is_unique_violation(&self) -> bool {
        match self {
            RepoError::Sqlx(err) => err
                .as_database_error()
                .is_some_and(|db| db.is_unique_violation()),
            RepoError::NoTenant => false,
        }
    }
}

/// Milliseconds since the Unix epoch (order ages for the resolver).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The tenant every query is restricted to.
fn current_tenant() -> Result<TenantId, RepoError> {
    context::tenant().ok_or(RepoError::NoTenant)
}

/// Runs one statement under a `db` span and logs its outcome: the "database" level of the
/// request tree.
async fn statement<T, Fut>(sql: &'static str, fut: Fut) -> Result<T, sqlx::Error>
where
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    async {
        let result = fut.await;
        match &result {
            Ok(_) => debug!("query ok"),
            Err(err) => warn!(error = %err, "query failed"),
        }
        result
    }
    .instrument(tracing::info_span!("db", statement = sql))
    .await
}
