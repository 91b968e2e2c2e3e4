//! Database transactions that follow the request, for [sqlx] 0.8 (PostgreSQL, SQLite,
//! MySQL/MariaDB), and tenant isolation that PostgreSQL itself enforces.
//!
//! Run a block in a transaction with [`TxPool::transaction`], and every repository call inside
//! it, however deep, joins that transaction without receiving it as a parameter. Outside a
//! block the same calls use the pool. The transaction travels in the [`contextflow`] context,
//! like a request id, so it follows `.await` through the whole call tree of the request, and
//! stops at spawned tasks.
//!
//! # Tour
//!
//! The usual layering: the controller handles the request, the service runs the use case in
//! one transaction, and the repositories issue queries through a [`TxPool`] they were given at
//! start-up, with sqlx's own query API (`&TxPool` is an [`sqlx::Executor`]). No function takes
//! a `&mut Transaction`.
//!
//! ```
//! # #[cfg(feature = "sqlite")] mod example {
//! use contextflow_sqlx::TxPool;
//! use sqlx::Sqlite;
//!
//! #[derive(Debug)]
//! pub enum AppError {
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
//! pub struct Orders {
//!     pub db: TxPool<Sqlite>,
//! }
//!
//! impl Orders {
//!     pub async fn insert(&self, item: &str, qty: i64) -> Result<i64, sqlx::Error> {
//!         sqlx::query_scalar("INSERT INTO orders (item, qty) VALUES ($1, $2) RETURNING id")
//!             .bind(item)
//!             .bind(qty)
//!             .fetch_one(&self.db)
//!             .await
//!     }
//!
//!     pub async fn count(&self) -> Result<i64, sqlx::Error> {
//!         sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&self.db).await
//!     }
//! }
//!
//! #[derive(Clone)]
//! pub struct Inventory {
//!     pub db: TxPool<Sqlite>,
//! }
//!
//! impl Inventory {
//!     /// Takes `qty` items from stock; `false` when there are not enough.
//!     pub async fn take(&self, item: &str, qty: i64) -> Result<bool, sqlx::Error> {
//!         let sql = "UPDATE stock SET qty = qty - $2 WHERE item = $1 AND qty >= $2";
//!         let done = sqlx::query(sql).bind(item).bind(qty).execute(&self.db).await?;
//!         Ok(done.rows_affected() == 1)
//!     }
//! }
//!
//! // ----- service: one transaction around the use case -----
//!
//! pub struct OrderService {
//!     pub db: TxPool<Sqlite>,
//!     pub orders: Orders,
//!     pub inventory: Inventory,
//! }
//!
//! impl OrderService {
//!     pub async fn place(&self, item: &str, qty: i64) -> Result<i64, AppError> {
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
//! pub async fn post_order(service: &OrderService, item: &str, qty: i64) -> (u16, String) {
//!     match service.place(item, qty).await {
//!         Ok(id) => (201, format!("order {id}")),
//!         Err(AppError::OutOfStock) => (409, "out of stock".to_string()),
//!         Err(AppError::Db(err)) => (500, format!("database error: {err}")),
//!     }
//! }
//! # }
//! # #[cfg(feature = "sqlite")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), sqlx::Error> {
//! # use example::*;
//! # use contextflow_sqlx::TxPool;
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
//! # #[cfg(not(feature = "sqlite"))] fn main() {}
//! ```
//!
//! # The rules
//!
//! | What happens | Result |
//! |---|---|
//! | the block returns `Ok` | committed, then the [after-commit hooks](TxPool::after_commit) run |
//! | the block returns `Err` | rolled back, the error returned |
//! | the block panics | rolled back, then the panic continues |
//! | the block's future is dropped (client disconnect, timeout, aborted task), at any point: `BEGIN`, a query, `SAVEPOINT`, `COMMIT`, `ROLLBACK` | rolled back, and the connection returns to the pool only once the server confirmed no transaction is open on it; otherwise it is closed |
//! | dropped while `COMMIT` is in flight, with after-commit hooks (on a tokio runtime) | the `COMMIT` and then the hooks finish in a task of their own, which logs that the caller had gone: the hooks of a transaction that committed always run |
//! | dropped while `COMMIT` is in flight, no hooks | outcome unknown: logged at `warn` in the dropping code's context, then resolved (committed / rolled back) in a second log line (on MySQL after a failed statement or a raw [`Conn`], when the check before `COMMIT` rides with it, the connection is closed and the outcome stays unknown: logged at `error`) |
//! | inside a block, a statement's future dropped before its result (a timeout around one query, or around a nested block with a query in flight) | it may have run: the whole transaction is poisoned ([`TransactionClosed`]), not only a nested block's savepoint, since the connection may still owe the statement's answer (some drivers cannot be trusted with it after that); later statements fail and the block ends in that error, rolled back (the connection cleaned up, or closed, in the background). A row stream dropped after its first item is not such a case |
//! | the connection breaks during `COMMIT` | [`CommitUnknown`] error, logged at `error`; after-commit hooks do not run |
//! | `transaction` inside a block | a `SAVEPOINT`: `Ok` releases it, `Err`, panic or drop roll back its work only (a drop with one of its statements in flight: see above), and end every savepoint opened beneath it in other tasks (their later statements get [`TransactionClosed`]) |
//! | [`transaction_with`](TxPool::transaction_with) and a [`Propagation`] | join, require, refuse, or begin an independent transaction; a block joined from another task (a snapshot of the context) is waited for by the end of the level it joined: all of its work is committed or none, and its failure rolls that level back |
//! | a query outside any block | runs on the pool, committed on its own |
//! | a task started with [`contextflow::spawn`] (or `tokio::spawn`) inside a block | gets the pool, not the transaction |
//! | concurrent queries inside one block (`join!`) | run one at a time on the transaction's connection |
//! | a [`Conn`] or a row stream held while the same task runs another query of the block | that query fails at once with [`ConnectionBusy`] (it would wait forever) |
//! | concurrent requests | each its own transaction, on its own connection |
//!
//! When the commit itself fails (the server refuses it), the block's value is dropped and the
//! error returned (through `E: From<sqlx::Error>`); nothing was committed.
//!
//! # Recipe: cancellation safety, and what it costs
//!
//! contextflow-sqlx runs `BEGIN`, `COMMIT`, `ROLLBACK` and the savepoint commands itself and
//! records what it has sent on each connection (idle, `BEGIN` sent, in a transaction, `COMMIT`
//! sent, ...). It never trusts a rollback queued by a destructor (sqlx 0.8 can leave a
//! PostgreSQL connection inside a transaction when a future is dropped during `BEGIN`): a
//! connection dropped in any state but "idle" goes to a background task that drains what was
//! in flight, rolls back and asks the server whether a transaction is still open; it is given
//! back to the pool only when the server says no, and is closed otherwise (or when there is no
//! runtime left to run the task). Closing a connection ends its transaction on the server.
//!
//! Every connection taken from the pool is also checked with the server before use
//! ([`TxPoolBuilder::check_on_acquire`]), so a connection left inside a transaction by code
//! that used the sqlx pool directly is closed, never used. On PostgreSQL, a [`TenantPool`]'s
//! connection taken for a transaction gets the check, the `BEGIN` and the tenant setting in one
//! message (one round trip; the check, a statement that fails inside a transaction block, comes
//! first, and the server runs nothing after a failure). The check is a query, so it takes the
//! transaction's snapshot: where the block could still set its isolation level (a plain
//! [`TxPool`], whose block may start with `SET TRANSACTION ...`, or a begin statement with
//! options), it is a message of its own before the `BEGIN`. Elsewhere, and for a connection
//! taken outside a transaction, the check costs one round trip (PostgreSQL: `SELECT 1 WHERE now() <>
//! statement_timestamp()`; MySQL: the "in transaction" flag of the protocol; SQLite: a
//! `ROLLBACK`). It also finds broken connections, so turning off sqlx's own ping makes its net
//! cost zero:
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
//! let pool = sqlx::postgres::PgPoolOptions::new()
//!     .max_connections(16)
//!     .test_before_acquire(false) // contextflow-sqlx's check replaces the ping
//!     .connect("postgres://postgres@127.0.0.1:5432/app")
//!     .await?;
//! let db = contextflow_sqlx::TxPool::new(pool);
//! # let _ = db;
//! # Ok(()) }
//! # #[cfg(not(feature = "postgres"))] fn main() {}
//! ```
//!
//! # Recipe: typed queries, `query!`, streams
//!
//! `&TxPool` (and `&TenantPool`, `&AdminPool`) is an [`sqlx::Executor`]: `query`, `query_as`,
//! `query_scalar`, what the `query!`/`query_as!` macros expand to (a `Map` over the row, the
//! same as `query(..).try_map(..)`) and `fetch` streams run on the context's transaction, or
//! on the pool outside one.
//!
//! ```
//! # #[cfg(feature = "sqlite")]
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
//! use futures_util::TryStreamExt as _;
//!
//! # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
//! let db = contextflow_sqlx::TxPool::new(pool);
//! sqlx::query("CREATE TABLE t (id INTEGER, name TEXT)").execute(&db).await?;
//!
//! db.transaction(|| async {
//!     sqlx::query("INSERT INTO t VALUES (1, 'one'), (2, 'two')").execute(&db).await?;
//!     let items: Vec<(i64, String)> = sqlx::query_as("SELECT id, name FROM t").fetch_all(&db).await?;
//!     assert_eq!(items[1], (2, "two".to_string()));
//!     // What `query!` produces: a `Map` from the row to the record.
//!     let names: Vec<String> = sqlx::query("SELECT name FROM t ORDER BY id")
//!         .try_map(|row: sqlx::sqlite::SqliteRow| sqlx::Row::try_get(&row, 0))
//!         .fetch_all(&db)
//!         .await?;
//!     assert_eq!(names, ["one", "two"]);
//!     // A stream holds the transaction's connection until it ends: drain it first.
//!     let ids: Vec<i64> = sqlx::query_scalar::<_, i64>("SELECT id FROM t").fetch(&db).try_collect().await?;
//!     assert_eq!(ids, [1, 2]);
//!     Ok::<_, sqlx::Error>(())
//! })
//! .await?;
//! # Ok(()) }
//! # #[cfg(not(feature = "sqlite"))] fn main() {}
//! ```
//!
//! # Recipe: propagation modes and after-commit events
//!
//! [`transaction`](TxPool::transaction) opens a transaction, or a savepoint inside one
//! ([`Propagation::Nested`]). [`transaction_with`](TxPool::transaction_with) takes the modes
//! Spring and @nestjs-cls/transactional users know: [`Required`](Propagation::Required) (join),
//! [`RequiresNew`](Propagation::RequiresNew), [`Mandatory`](Propagation::Mandatory),
//! [`Never`](Propagation::Never). [`after_commit`](TxPool::after_commit) registers work that
//! runs only once the top-level transaction committed: the place to publish events.
//!
//! ```
//! # #[cfg(feature = "sqlite")]
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
//! use contextflow_sqlx::{Propagation, TxPool};
//! use sqlx::Sqlite;
//! use std::sync::{Arc, Mutex};
//!
//! type Outbox = Arc<Mutex<Vec<&'static str>>>;
//!
//! /// A repository method that must run inside its caller's transaction.
//! async fn record(db: &TxPool<Sqlite>, outbox: &Outbox, what: &'static str) -> Result<(), sqlx::Error> {
//!     let outbox = outbox.clone();
//!     db.transaction_with(Propagation::Mandatory, move || async move {
//!         db.after_commit(async move { outbox.lock().unwrap().push(what) }).await;
//!         Ok(())
//!     })
//!     .await
//! }
//!
//! # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
//! let db = TxPool::new(pool);
//! let outbox = Outbox::default();
//! let record = |what| record(&db, &outbox, what);
//!
//! assert!(record("refused").await.is_err()); // no transaction: refused, nothing registered
//! let _ = db
//!     .transaction(|| async {
//!         record("rolled back").await?;
//!         Err::<(), _>(sqlx::Error::RowNotFound) // rollback: the hook is dropped
//!     })
//!     .await;
//! db.transaction(|| async { record("order.placed").await }).await?;
//! assert_eq!(*outbox.lock().unwrap(), ["order.placed"]);
//! # Ok(()) }
//! # #[cfg(not(feature = "sqlite"))] fn main() {}
//! ```
//!
//! # Recipe: tenants kept apart by PostgreSQL row-level security
//!
//! A [`TenantPool`] sets the tenant of the current context for every transaction (`SELECT
//! set_config('app.tenant_id', $1, true)`, transaction-local, right after `BEGIN`) and gives
//! every statement outside a transaction a transaction of its own; the database's policies then
//! filter every query, including one that forgets its `WHERE`. No statement runs without a
//! tenant; a transaction keeps the tenant it began with. Its start-up check refuses a role that
//! would bypass the policies. Cross-tenant work (migrations, reports) goes through the separate
//! [`AdminPool`] type. A statement outside a block is committed before its rows are handed out
//! (`fetch` then yields them from memory), so a caller that stops after the first row of an
//! `INSERT ... RETURNING` holds the id of a row that exists; a large read streams inside a
//! [`transaction`](TxPool::transaction) block.
//!
//! A service started from a superuser `DATABASE_URL` migrates as an owner role and serves as
//! an application role that is subject to the policies:
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use contextflow::AsyncLocal;
//! use contextflow_sqlx::{AdminPool, TenantPool, DEFAULT_COLUMN, DEFAULT_SETTING};
//! use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
//!
//! /// Bound by the authentication middleware, from a verified token only.
//! static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");
//!
//! let url: PgConnectOptions = "postgres://postgres@127.0.0.1:5432/app".parse()?;
//!
//! // 1. As the superuser: the two roles, created idempotently.
//! let superuser = PgPoolOptions::new().max_connections(1).connect_with(url.clone()).await?;
//! sqlx::raw_sql(
//!     "DO $$ BEGIN
//!        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_owner') THEN
//!          CREATE ROLE app_owner LOGIN; END IF;
//!        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_user') THEN
//!          CREATE ROLE app_user LOGIN NOSUPERUSER NOBYPASSRLS; END IF;
//!      END $$;
//!      GRANT CREATE, USAGE ON SCHEMA public TO app_owner;",
//! )
//! .execute(&superuser)
//! .await?;
//!
//! // 2. As the owner: the schema, row-level security, and the application role's grants.
//! let owner = AdminPool::new(
//!     PgPoolOptions::new().connect_with(url.clone().username("app_owner")).await?,
//! );
//! owner
//!     .execute(sqlx::query(
//!         "CREATE TABLE IF NOT EXISTS orders (id BIGSERIAL PRIMARY KEY, tenant_id TEXT NOT NULL)",
//!     ))
//!     .await?;
//! owner.enable_row_level_security("orders", DEFAULT_COLUMN, DEFAULT_SETTING).await?;
//! owner.execute(sqlx::query("GRANT SELECT, INSERT, UPDATE, DELETE ON orders TO app_user")).await?;
//! owner.execute(sqlx::query("GRANT USAGE ON SEQUENCE orders_id_seq TO app_user")).await?;
//!
//! // 3. Serve as the application role: the check refuses anything unsafe.
//! let pool = PgPoolOptions::new().connect_with(url.username("app_user")).await?;
//! let db = TenantPool::new(pool, &TENANT).await?;
//!
//! TENANT
//!     .scope("acme".to_string(), async {
//!         sqlx::query("INSERT INTO orders (tenant_id) VALUES (current_setting('app.tenant_id'))")
//!             .execute(&*db)
//!             .await?;
//!         // No WHERE clause: the policy shows acme's rows only.
//!         let mine: i64 = sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&*db).await?;
//!         # let _ = mine;
//!         Ok::<_, sqlx::Error>(())
//!     })
//!     .await?;
//! # Ok(()) }
//! # #[cfg(not(feature = "postgres"))] fn main() {}
//! ```
//!
//! With a password, give the application role one (`ALTER ROLE app_user PASSWORD ..`) and
//! `.password(..)` in its connect options. Do not serve through the superuser connection with
//! `SET ROLE app_user`: `RESET ROLE` undoes it, and the start-up check refuses such a session.
//!
//! **Pitfalls of row-level security through a pool**, and what contextflow-sqlx does:
//!
//! - *Session-level `SET app.tenant_id` (or `set_config(.., false)`) through a pool* stays on
//!   the connection after the request and leaks into the next request that gets it. The tenant
//!   pool only ever sets it transaction-locally.
//! - *`current_setting('app.tenant_id', true)` returns `''`, not `NULL`, on a connection where
//!   it was ever set* (even locally, in an earlier transaction). Policies must treat `''` as "no
//!   tenant": `NULLIF(current_setting('app.tenant_id', true), '')`, as the policy that
//!   [`AdminPool::enable_row_level_security`] creates does, so such a connection sees nothing.
//! - *Views run with their owner's rights*: a view owned by a superuser or by the tables' owner
//!   shows every tenant's rows, whatever the caller. Create views with `WITH
//!   (security_invoker = true)` (PostgreSQL 15+); the start-up check refuses a view that
//!   reads a tenant table (directly or through other views, whatever columns it keeps) without
//!   it, and any materialized view that reads one.
//! - *The tables' owner bypasses its own policies* unless `FORCE ROW LEVEL SECURITY` is set, and
//!   can always turn them off: serve as a role that owns nothing (the check refuses an owner).
//! - *Permissive policies are combined with `OR`*: one `USING (true)` policy beside the
//!   tenant's opens the table to every tenant. The check refuses a permissive policy for the
//!   pool's role that reads neither the setting nor a function of the database's own.
//! - *`TRUNCATE` ignores row-level security*, and so does a role the pool's role can `SET
//!   ROLE` to that has `BYPASSRLS`: the check refuses both.
//! - *Poolers in transaction mode* (PgBouncer `pool_mode = transaction`) hand each transaction a
//!   different server connection: transaction-local settings are exactly right there, while
//!   session settings, `SET ROLE`, advisory locks and prepared statements are not; the tenant
//!   pool's one-transaction-per-statement rule keeps every statement in a transaction that
//!   carries its tenant.
//!
//! # Why a spawned task gets the pool
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
//! # #[cfg(feature = "sqlite")]
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use contextflow_sqlx::TxPool;
//!
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
//! # #[cfg(not(feature = "sqlite"))] fn main() {}
//! ```
//!
//! A full [`Snapshot::capture`](contextflow::Snapshot::capture), unlike a spawn, carries every
//! variable, the transaction included: code run inside such a snapshot joins the transaction
//! while the block lasts, and gets a [`TransactionClosed`] error after it ended, never a
//! silent fall-back to the pool. The same holds for a nested block: once its savepoint is
//! released or rolled back, a snapshot captured inside it gets [`TransactionClosed`] rather
//! than running in the enclosing transaction.
//!
//! # PostgreSQL, MySQL/MariaDB and SQLite
//!
//! **PostgreSQL.** A failed statement aborts the whole transaction: every later statement
//! fails, and PostgreSQL turns a `COMMIT` into a silent `ROLLBACK`. To recover from an expected
//! error (a unique violation, say), run that statement in a nested `transaction`: rolling back
//! the savepoint makes the transaction usable again. A nested block that swallows such an error
//! and returns `Ok` gets the `RELEASE SAVEPOINT` error instead; a top-level block that does so
//! (or that ran statements on a raw [`Conn`], which contextflow-sqlx cannot see) gets an error
//! instead of a commit, because contextflow-sqlx asks the server before such a `COMMIT`
//! whether the transaction is still healthy. A serialization failure (`40001`) comes back as
//! the block's error, and retrying means running the block again.
//!
//! **MySQL/MariaDB.** A deadlock (1213) makes the server roll the whole transaction back and
//! run the statements that follow in autocommit mode, and so do a lock wait timeout (1205)
//! on a server with `innodb_rollback_on_timeout`, MariaDB's snapshot isolation conflict
//! (1020, with `innodb_snapshot_isolation`, the default from 11.6.2) and a full lock table
//! (1206): contextflow-sqlx marks the transaction poisoned on any of these, so nothing after
//! it runs and the block ends in [`TransactionClosed`]. (SQLite likewise, on `SQLITE_FULL`, `SQLITE_IOERR`, `SQLITE_BUSY`
//! and `SQLITE_NOMEM`, after which it may have rolled the transaction back. Any other error
//! on SQLite may have ended it too, with a code that does not say so: a `UNIQUE ON CONFLICT
//! ROLLBACK` column, `INSERT OR ROLLBACK`, a trigger's `RAISE(ROLLBACK, ...)`. After such an
//! error the next statement, savepoint or commit first asks the connection, in process,
//! whether the transaction is still open, and finds it [`TransactionClosed`] if not.) On
//! MySQL/MariaDB, DDL (`CREATE TABLE`, ...), `LOCK TABLES`, `BEGIN` and sqlx's own `begin()`
//! on a block's connection (contextflow-sqlx opens the transaction itself, so sqlx sees none
//! and sends `BEGIN`, not a `SAVEPOINT`) commit what the block wrote so far, implicitly: keep
//! them out of blocks, and nest with [`TxPool::transaction`] (a savepoint) instead. The
//! commit then finds the transaction gone and ends the block in [`TransactionClosed`], but
//! what was written before is committed. Keep the server's `autocommit` on (its default) for
//! the pool's sessions: under `autocommit = 0` a statement outside a block opens a
//! transaction that nothing commits, and the pool closes that connection, the write with it.
//!
//! **SQLite.** One writer at a time: a block holds the database's write lock from its first
//! write until it ends, and other writers wait up to the connection's busy timeout (sqlx's
//! default: 5 s). In WAL mode (`SqliteConnectOptions::journal_mode(SqliteJournalMode::Wal)`),
//! reads outside the writer's transaction, on the pool's other connections, proceed while it is
//! open and see the last committed state: give the pool more than one connection. Keep blocks
//! short, and do not wait inside a block, after its first write, for another connection's
//! write (an awaited spawned task, a [`Propagation::RequiresNew`] block): it waits for the
//! block, which waits for it, until the busy timeout. `BEGIN` is deferred, so a block that
//! reads and then writes can fail with "database is locked" when another connection wrote in
//! between: open such blocks with `transaction_with("BEGIN IMMEDIATE", ..)`. Every connection
//! to `sqlite::memory:` is a separate database: use one connection, or a file.
//!
//! # Feature flags
//!
//! - `postgres`: sqlx's PostgreSQL driver, the [`PgTxPool`] alias, [`TenantPool`] over
//!   `sqlx::Postgres`.
//! - `sqlite`: sqlx's SQLite driver and the [`SqliteTxPool`] alias.
//! - `mysql`: sqlx's MySQL/MariaDB driver and the [`MySqlTxPool`] alias.
//!
//! Each works on its own. sqlx's `Any` driver is always supported (`TxPool<Any>`,
//! `TenantPool<Any>` over PostgreSQL); bring its drivers through your `sqlx` dependency.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod conn;
mod dialect;
mod error;
mod executor;
mod pool;
mod propagation;
mod state;
mod tenant;
mod tracked;

pub use crate::{
    conn::Conn,
    error::{
        CommitUnknown, ConnectionBusy, PropagationError, Refusal, SetupError, TenantError,
        TenantErrorKind, TransactionClosed,
    },
    pool::{TxPool, TxPoolBuilder},
    propagation::{Propagation, TxOptions},
    tenant::{
        AdminPool, RlsDatabase, TenantPool, TenantPoolBuilder, DEFAULT_COLUMN, DEFAULT_SETTING,
    },
};

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

/// A [`TxPool`] over MySQL or MariaDB (feature `mysql`).
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), sqlx::Error> {
/// let pool = sqlx::MySqlPool::connect("mysql://root@127.0.0.1:3306/test").await?;
/// let db = contextflow_sqlx::MySqlTxPool::new(pool);
/// # let _ = db;
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub type MySqlTxPool = TxPool<sqlx::MySql>;
