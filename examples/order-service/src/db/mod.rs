//! The database: `contextflow-sqlx` pools over sqlx's `Any` driver, so the same repositories
//! run on SQLite and PostgreSQL.
//!
//! Repositories never take a transaction or a tenant parameter: [`Db::transaction`] binds the
//! transaction to the context and every repository query joins it; the tenant comes from
//! [`crate::context::TENANT`].
//!
//! Tenants are kept apart twice on PostgreSQL, once on SQLite:
//! - **PostgreSQL: row-level security.** Tenant requests go through a
//!   [`TenantPool`](contextflow_sqlx::TenantPool) connected as a role that owns nothing and
//!   cannot bypass row-level security; it sets `app.tenant_id` in every transaction, and each
//!   table's policy shows and accepts only that tenant's rows, also to a query that forgets its
//!   `WHERE` (set-up: [`postgres`]). The few queries that cross tenants on purpose (the outbox
//!   worker's batch, the resolver's work list, seeding) go through an
//!   [`AdminPool`](contextflow_sqlx::AdminPool) connected as the tables' owner: [`Db::admin`].
//! - **Both: `WHERE tenant_id = <current tenant>`** in every tenant query, defence in depth on
//!   PostgreSQL and the only guard on SQLite (which has no row-level security).

mod inventory;
mod orders;
mod outbox;
pub mod postgres;

use std::future::Future;

use contextflow_sqlx::TxPool;
use sqlx::{any::AnyPoolOptions, Any};
use tracing::{debug, warn, Instrument as _};

pub use self::{
    inventory::{InventoryRepository, StockItem},
    orders::{Order, OrderItem, OrderRepository, PendingOrder},
    outbox::{OutboxRepository, OutboxRow},
    postgres::Roles,
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

/// Why the database could not be opened.
#[derive(Debug)]
pub enum ConnectError {
    /// The URL or the server cannot be used as configured.
    Config(String),
    /// The database failed.
    Sqlx(sqlx::Error),
    /// The application role could see past row-level security: refused to serve.
    Refused(contextflow_sqlx::SetupError),
}

/// The service's database handle: cheap to clone, shared by all repositories.
#[derive(Clone, Debug)]
pub struct Db {
    /// Tenant requests: on PostgreSQL a `TenantPool`'s (row-level security).
    pool: TxPool<Any>,
    /// Cross-tenant work: on PostgreSQL an `AdminPool`'s (the tables' owner); on SQLite the
    /// same pool as `pool` (one connection: two pools would wait for each other).
    admin: TxPool<Any>,
    backend: Backend,
    roles: Option<Roles>,
}

// ===== impl Db =====

impl Db {
    /// Connects to `url` (`sqlite://...` or `postgres://...`) and creates the schema if it is
    /// missing. On PostgreSQL `url` names a superuser: the service creates its owner and
    /// application roles, migrates as the owner and serves as the application role
    /// ([`postgres`]).
    ///
    /// # Errors
    /// When the URL names another database, connecting or creating the schema fails, or (on
    /// PostgreSQL) the URL's role is not a superuser or the application role could bypass
    /// row-level security ([`ConnectError::Refused`]).
    pub async fn connect(url: &str) -> Result<Db, ConnectError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            // Never the text itself: a libpq `key=value` string holds its password in clear.
            let scheme = url
                .split_once("://")
                .map(|(scheme, _)| scheme)
                .filter(|scheme| {
                    scheme.len() <= 32
                        && scheme.starts_with(|c: char| c.is_ascii_lowercase())
                        && scheme.bytes().all(|b| {
                            b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-".contains(&b)
                        })
                });
            return Err(ConnectError::Config(match scheme {
                Some(scheme) => {
                    format!("unsupported database url scheme {scheme:?} (sqlite:// or postgres://)")
                }
                None => "DATABASE_URL is not a URL (sqlite://... or postgres://...)".to_owned(),
            }));
        };
        if backend == Backend::Postgres {
            // A few connections per core of a small server: on this 2-core machine 8 gave
            // 1,260-1,630 orders/s with p99 62-73 ms where 16 gave 1,281-1,306 with p99 87-101
            // (README, "Throughput and profile"); more only queue on row locks and CPU.
            let pools = postgres::connect(url, 8).await?;
            return Ok(Db {
                pool: pools.tenant.as_tx_pool().clone(),
                admin: pools.admin.as_tx_pool().clone(),
                backend,
                roles: Some(pools.roles),
            });
        }
        // SQLite has one writer at a time, and `TxPool` begins transactions with a plain
        // (deferred) `BEGIN`: one connection queues writers fairly in the pool instead of in
        // SQLite's sleeping busy handler.
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            // No ping before each use: it is a round trip per transaction (two per order), and a
            // connection that broke fails its first statement, which fails the request.
            .test_before_acquire(false)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL with FULL sync: every commit is on disk before it returns, readers
                    // beside the writer. NORMAL (one fsync per checkpoint) survives a crash of
                    // the process but may lose the last commits to a power cut or an OS
                    // crash, and step 1's commit is what makes a charge safe: an order lost
                    // after its charge would be a charge without an order. sqlx sets no
                    // journal mode itself (without this, SQLite's default rollback journal
                    // made and deleted a `-journal` file, with fsyncs, per write
                    // transaction). WAL is recorded in the database file; an in-memory
                    // database answers "memory" and stays as it is.
                    sqlx::query("PRAGMA journal_mode = WAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA synchronous = FULL")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        let pool = TxPool::new(pool);
        let db = Db {
            admin: pool.clone(),
            pool,
            backend,
            roles: None,
        };
        for statement in schema_statements(Backend::Sqlite) {
            db.admin.execute(sqlx::query(&statement)).await?;
        }
        // A database made by an older build: its orders table gets the payment key column
        // (SQLite has no `ADD COLUMN IF NOT EXISTS`).
        let has_key: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pragma_table_info('orders') WHERE name = 'payment_key'",
        )
        .fetch_one(&db.admin)
        .await?;
        if has_key == 0 {
            db.admin.execute(sqlx::query(ADD_PAYMENT_KEY)).await?;
        }
        Ok(db)
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool of tenant requests, which the repositories use: on PostgreSQL a
    /// `TenantPool`'s, so every statement sees only the context's tenant's rows and fails
    /// without a tenant.
    pub fn pool(&self) -> &TxPool<Any> {
        &self.pool
    }

    /// The pool of the queries that cross tenants on purpose: on PostgreSQL an `AdminPool`'s
    /// (the tables' owner, not subject to the policies); on SQLite the same as [`Db::pool`].
    pub fn admin(&self) -> &TxPool<Any> {
        &self.admin
    }

    /// Closes the pools: waits for every connection to come back, then closes each one
    /// properly (PostgreSQL logs a reset connection otherwise). Nothing can use this `Db`, or
    /// any clone of it, afterwards.
    pub async fn close(&self) {
        self.pool.pool().close().await;
        self.admin.pool().close().await;
    }

    /// The owner and application roles, on PostgreSQL.
    pub fn roles(&self) -> Option<&Roles> {
        self.roles.as_ref()
    }

    /// Adds `catalogue` (`(sku, name, stock, price in cents)`) to `tenant`'s products that are
    /// not there yet, through the admin pool (start-up, not a tenant request).
    ///
    /// # Errors
    /// Database errors.
    pub async fn seed(
        &self,
        tenant: &TenantId,
        catalogue: &[(&str, &str, i64, i64)],
    ) -> Result<(), sqlx::Error> {
        for (sku, name, stock, price_cents) in catalogue {
            self.admin
                .execute(
                    sqlx::query(
                        "INSERT INTO inventory (tenant_id, sku, name, stock, price_cents)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (tenant_id, sku) DO NOTHING",
                    )
                    .bind(tenant.as_str().to_owned())
                    .bind((*sku).to_owned())
                    .bind((*name).to_owned())
                    .bind(*stock)
                    .bind(*price_cents),
                )
                .await?;
        }
        Ok(())
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
                // DEBUG: a commit is the normal end of every transaction, and the request's
                // own lines ("order placed", "request finished") say it succeeded; a rollback
                // is the news (WARN).
                Ok(_) => debug!("transaction committed"),
                Err(err) => warn!(error = %err, "transaction rolled back"),
            }
            result
        }
        .instrument(span)
        .await
    }
}

// ===== impl ConnectError =====

impl From<sqlx::Error> for ConnectError {
    fn from(err: sqlx::Error) -> Self {
        ConnectError::Sqlx(err)
    }
}

impl From<contextflow_sqlx::SetupError> for ConnectError {
    fn from(err: contextflow_sqlx::SetupError) -> Self {
        match err {
            contextflow_sqlx::SetupError::Database(err) => ConnectError::Sqlx(err),
            refused => ConnectError::Refused(refused),
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Config(why) => f.write_str(why),
            ConnectError::Sqlx(err) => write!(f, "database error: {err}"),
            ConnectError::Refused(err) => write!(f, "refusing to serve: {err}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// The statements that create the tables and indexes if they do not exist.
/// Adds the payment key column to an orders table made by an older build (its rows keep
/// `NULL`: their charges were made with the key `order-<id>`).
pub(crate) const ADD_PAYMENT_KEY: &str = "ALTER TABLE orders ADD COLUMN payment_key TEXT";

fn schema_statements(backend: Backend) -> [String; 8] {
    let id_column = match backend {
        Backend::Sqlite => "id INTEGER PRIMARY KEY AUTOINCREMENT",
        Backend::Postgres => "id BIGSERIAL PRIMARY KEY",
    };
    [
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
                    created_ms BIGINT NOT NULL DEFAULT 0,
                    payment_key TEXT
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
    ]
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
