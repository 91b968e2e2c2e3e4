//! Database transactions that follow the request, for [sqlx] 0.8 (PostgreSQL, SQLite).
//!
//! Run a block in a transaction with [`TxPool::transaction`], and every repository call inside
//! it, however deep, joins that transaction without receiving it as a parameter. Outside a
//! block the same calls use the pool. The transaction travels in the
//! [`contextflow`] context, like a request id, so it follows `.await` through the whole call
//! tree of the request, and stops at spawned tasks.
//!
//! # Tour
//!
//! The usual layering: the controller handles the request, the service runs the use case in
//! one transaction, and the repositories issue queries through a [`TxPool`] they were given at
//! start-up. No function takes a `&mut Transaction`.
//!
//! ```
//! use contextflow_sqlx::TxPool;
//! use sqlx::{Row, Sqlite};
//!
//! #[derive(Debug)]
//! enum AppError {
//!     OutOfStock,
//!     Db(sqlx::Error),
//! }
//!
//! // `transaction` converts BEGIN/COMMIT errors into the block's error type.
//! impl From<sqlx::Error> for AppError {
//!     fn from(err: sqlx::Error) -> Self {
//!         AppError::Db(err)
//!     }
//! }
//!
//! // ----- repositories: no transaction parameter -----
//!
//! #[derive(Clone)]
//! struct Orders {
//!     db: TxPool<Sqlite>,
//! }
//!
//! impl Orders {
//!     async fn insert(&self, item: &str, qty: i64) -> Result<i64, sqlx::Error> {
//!         let sql = "INSERT INTO orders (item, qty) VALUES ($1, $2) RETURNING id";
//!         let row = self.db.fetch_one(sqlx::query(sql).bind(item).bind(qty)).await?;
//!         Ok(row.get(0))
//!     }
//!
//!     async fn count(&self) -> Result<i64, sqlx::Error> {
//!         let mut conn = self.db.acquire().await?;
//!         sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&mut *conn).await
//!     }
//! }
//!
//! #[derive(Clone)]
//! struct Inventory {
//!     db: TxPool<Sqlite>,
//! }
//!
//! impl Inventory {
//!     /// Takes `qty` items from stock; `false` when there are not enough.
//!     async fn take(&self, item: &str, qty: i64) -> Result<bool, sqlx::Error> {
//!         let sql = "UPDATE stock SET qty = qty - $2 WHERE item = $1 AND qty >= $2";
//!         let done = self.db.execute(sqlx::query(sql).bind(item).bind(qty)).await?;
//!         Ok(done.rows_affected() == 1)
//!     }
//! }
//!
//! // ----- service: one transaction around the use case -----
//!
//! struct OrderService {
//!     db: TxPool<Sqlite>,
//!     orders: Orders,
//!     inventory: Inventory,
//! }
//!
//! impl OrderService {
//!     async fn place(&self, item: &str, qty: i64) -> Result<i64, AppError> {
//!         self.db
//!             .transaction(|| async {
//!                 let id = self.orders.insert(item, qty).await?;
//!                 if !self.inventory.take(item, qty).await? {
//!                     return Err(AppError::OutOfStock); // rolls the insert back
//!                 }
//!                 Ok(id)
//!             })
//!             .await
//!     }
//! }
//!
//! // ----- controller -----
//!
//! async fn post_order(service: &OrderService, item: &str, qty: i64) -> (u16, String) {
//!     match service.place(item, qty).await {
//!         Ok(id) => (201, format!("order {id}")),
//!         Err(AppError::OutOfStock) => (409, "out of stock".to_string()),
//!         Err(AppError::Db(err)) => (500, format!("database error: {err}")),
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), sqlx::Error> {
//! // Start-up: one `TxPool` per database, cloned into the repositories.
//! let pool = sqlx::sqlite::SqlitePoolOptions::new()
//!     .max_connections(1) // every connection to `sqlite::memory:` is its own database
//!     .connect("sqlite::memory:")
//!     .await?;
//! let db = TxPool::new(pool);
//! db.execute(sqlx::query("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT, qty INTEGER)"))
//!     .await?;
//! db.execute(sqlx::query("CREATE TABLE stock (item TEXT PRIMARY KEY, qty INTEGER)")).await?;
//! db.execute(sqlx::query("INSERT INTO stock VALUES ('widget', 5)")).await?;
//!
//! let orders = Orders { db: db.clone() };
//! let service = OrderService {
//!     db: db.clone(),
//!     orders: orders.clone(),
//!     inventory: Inventory { db: db.clone() },
//! };
//!
//! assert_eq!(post_order(&service, "widget", 3).await, (201, "order 1".to_string()));
//! assert_eq!(post_order(&service, "widget", 3).await.0, 409);
//! assert_eq!(orders.count().await?, 1); // the refused order left nothing behind
//! # Ok(())
//! # }
//! ```
//!
//! # The rules
//!
//! | What happens | Result |
//! |---|---|
//! | the block returns `Ok` | committed |
//! | the block returns `Err` | rolled back, the error returned |
//! | the block panics | rolled back, then the panic continues |
//! | the block's future is dropped (client disconnect, timeout, aborted task) | rolled back: no partial work is ever committed |
//! | `transaction` (or `transaction_with`) inside a block | a `SAVEPOINT`: `Ok` releases it, `Err`, panic or drop roll back its work only |
//! | a query outside any block | runs on the pool, committed on its own |
//! | a task started with [`contextflow::spawn`] (or `tokio::spawn`) inside a block | gets the pool, not the transaction |
//! | concurrent queries inside one block (`join!`) | run one at a time on the transaction's connection |
//! | concurrent requests | each its own transaction, on its own connection |
//!
//! When the commit itself fails, the block's value is dropped and the error returned (through
//! `E: From<sqlx::Error>`); nothing was committed.
//!
//! **Drop.** A future cannot wait in its destructor, so a dropped block hands the rollback to
//! sqlx: dropping an open sqlx `Transaction` queues a `ROLLBACK` that runs before the
//! connection's next use, and sqlx uses (pings) every connection as it comes back to the
//! pool. The connection is therefore rolled back before anyone else gets it. A dropped
//! savepoint is rolled back the same way, before the enclosing block's next query.
//!
//! **Savepoints.** While a nested block is open, queries of the enclosing block (from a
//! `join!` next to it) wait until it ends, so they cannot be undone by its rollback; two nested
//! blocks of the same level run one after the other. Do not hold a [`Conn`] across a nested
//! `transaction` or another query of the same block: each waits for the other.
//!
//! ## Why a spawned task gets the pool
//!
//! The transaction belongs to the request that opened it: the request commits or rolls it back
//! when its block ends. A spawned task runs concurrently with the request and may outlive it,
//! so it would be committed or rolled back under the task's feet, and the task's writes would
//! vanish with a rollback it cannot see. The context variable that holds the transaction is
//! therefore marked [`Inherit::Never`](contextflow::Inherit::Never): a task started inside a
//! block, even with [`contextflow::spawn`] (which carries the request id and the rest of the
//! context), runs its queries on the pool, each committed on its own.
//!
//! ```
//! use contextflow_sqlx::TxPool;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let url = format!("sqlite://{}?mode=rwc", dir.path().join("db.sqlite").display());
//! # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(2).connect(&url).await?;
//! let db = TxPool::new(pool);
//! db.execute(sqlx::query("CREATE TABLE audit (what TEXT)")).await?;
//!
//! let result: Result<(), sqlx::Error> = db
//!     .transaction(|| async {
//!         let audit_db = db.clone();
//!         let audit = contextflow::spawn(async move {
//!             assert!(!audit_db.in_transaction()); // the pool, not the request's transaction
//!             audit_db.execute(sqlx::query("INSERT INTO audit VALUES ('attempt')")).await
//!         });
//!         audit.await.expect("the audit task panicked")?;
//!         Err(sqlx::Error::RowNotFound) // the request fails and rolls back...
//!     })
//!     .await;
//! assert!(result.is_err());
//!
//! // ...but the audit row, written on the pool, stays.
//! let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit").fetch_one(db.pool()).await?;
//! assert_eq!(rows, 1);
//! # Ok(())
//! # }
//! ```
//!
//! A full [`Snapshot::capture`](contextflow::Snapshot::capture), unlike a spawn, carries every
//! variable, the transaction included: code run inside such a snapshot joins the transaction
//! while the block lasts, and gets a [`TransactionClosed`] error after it ended, never a
//! silent fall-back to the pool.
//!
//! # PostgreSQL and SQLite
//!
//! **PostgreSQL.** A failed statement aborts the whole transaction: every later statement
//! fails, and PostgreSQL turns a `COMMIT` into a silent `ROLLBACK`. To recover from an expected
//! error (a unique violation, say), run that statement in a nested `transaction`: rolling back
//! the savepoint makes the transaction usable again. A nested block that swallows such an error
//! and returns `Ok` gets the `RELEASE SAVEPOINT` error instead; a top-level block that does so
//! gets an error instead of a commit (checked with one `SELECT 1` before each `COMMIT`), so the
//! block never reports success for work that was thrown away. To choose the isolation level,
//! open the block with [`TxPool::transaction_with`] and `BEGIN ISOLATION LEVEL SERIALIZABLE`;
//! a serialization failure (`40001`) comes back as the block's error, and retrying means
//! running the block again.
//!
//! **SQLite.** One writer at a time: a block holds the database's write lock from its first
//! write until it ends, and other writers wait up to the connection's busy timeout (sqlx's
//! default: 5 s). Keep blocks short, and do not wait inside a block, after its first write,
//! for another connection's write (an awaited spawned task): it waits for the block, which
//! waits for it, until the busy timeout. `BEGIN` is deferred, so a block that reads and then
//! writes can fail with "database is locked" when another connection wrote in between: open
//! such blocks with [`TxPool::transaction_with`] and `BEGIN IMMEDIATE`, which takes the write
//! lock at once (other writers then queue, up to the busy timeout). WAL mode (`journal_mode(SqliteJournalMode::Wal)`) lets readers run while a block
//! writes. Every connection to `sqlite::memory:` is a separate database: use one connection
//! (then anything that needs a second connection while a block runs waits for it), or a file.
//!
//! ```no_run
//! use contextflow_sqlx::TxPool;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), sqlx::Error> {
//! let pool = sqlx::postgres::PgPoolOptions::new()
//!     .max_connections(20)
//!     .connect("postgres://postgres@127.0.0.1:5432/app")
//!     .await?;
//! let db: TxPool<sqlx::Postgres> = TxPool::new(pool);
//! db.transaction_with("BEGIN ISOLATION LEVEL SERIALIZABLE", || async {
//!     db.execute(sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = $1").bind(1))
//!         .await?;
//!     Ok::<_, sqlx::Error>(())
//! })
//! .await?;
//! # Ok(())
//! # }
//! ```
//!
//! Any other sqlx driver works too: [`TxPool`] is generic over [`sqlx::Database`] and only
//! issues `SAVEPOINT`, `RELEASE SAVEPOINT` and `ROLLBACK TO SAVEPOINT` besides sqlx's own
//! `BEGIN`, `COMMIT` and `ROLLBACK`.
//!
//! # Feature flags
//!
//! - `postgres`: enables sqlx's PostgreSQL driver and the [`PgTxPool`] alias.
//! - `sqlite`: enables sqlx's SQLite driver and the [`SqliteTxPool`] alias.
//!
//! With neither, bring your own driver through your `sqlx` dependency.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod conn;
mod error;
mod pool;
mod state;

pub use crate::{conn::Conn, error::TransactionClosed, pool::TxPool};

/// A [`TxPool`] over PostgreSQL (feature `postgres`).
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), sqlx::Error> {
/// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/app").await?;
/// let db = contextflow_sqlx::PgTxPool::new(pool);
/// # let _ = db;
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub type PgTxPool = TxPool<sqlx::Postgres>;

/// A [`TxPool`] over SQLite (feature `sqlite`).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
/// let pool = sqlx::sqlite::SqlitePoolOptions::new()
///     .max_connections(1)
///     .connect("sqlite::memory:")
///     .await?;
/// let db = contextflow_sqlx::SqliteTxPool::new(pool);
/// assert_eq!(db.transaction_depth(), 0);
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub type SqliteTxPool = TxPool<sqlx::Sqlite>;
