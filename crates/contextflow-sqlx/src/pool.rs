//! [`TxPool`]: a pool whose queries join the transaction of the current context.

use std::{
    collections::VecDeque,
    fmt,
    future::Future,
    panic::{resume_unwind, AssertUnwindSafe, Location},
    sync::{
        atomic::{AtomicBool, AtomicU8, Ordering},
        Arc, Mutex as StdMutex, PoisonError,
    },
};

use contextflow::{AsyncLocal, Inherit};
use futures_util::FutureExt as _;
use sqlx::{Database, Execute, Executor, Pool};
use tracing::Instrument as _;

use crate::{
    conn::Conn,
    dialect::{self, Dialect, PgBeginFailure, TxStatus},
    error::{ClosedReason, PropagationError, TransactionClosed},
    propagation::{Propagation, TxOptions},
    state::{Failure, Hook, Level, PoolParking, RootGuard, Shared, Taken, TxGuard},
    tenant::TenantMode,
    tracked::{CommitError, Phase, Tracked},
};

/// A sqlx [`Pool`] whose queries use the transaction of the current context, if there is one.
///
/// [`transaction`](TxPool::transaction) runs a block in a transaction bound to the context;
/// [`execute`](TxPool::execute), the `fetch_*` methods, [`acquire`](TxPool::acquire) and
/// sqlx's own query API through `&TxPool` (it is an [`Executor`]) run on that transaction
/// inside such a block, and on the pool outside it. Repository code therefore never takes a
/// transaction parameter.
///
/// Cloning is cheap and clones share the transaction: build one `TxPool` per database at
/// start-up and hand clones to the repositories. Two `TxPool`s built separately are
/// independent, even over the same sqlx pool: neither sees the other's transaction.
///
/// Every connection taken from the pool is first checked with the server: one that is inside a
/// transaction (left so by code that used the sqlx pool directly) is closed, never used (see
/// [`TxPoolBuilder::check_on_acquire`]).
///
/// ```
/// # #[cfg(feature = "sqlite")]
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
/// use contextflow_sqlx::TxPool;
///
/// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
/// let db = TxPool::new(pool);
/// db.execute(sqlx::query("CREATE TABLE t (x INTEGER)")).await?;
///
/// db.transaction(|| async {
///     db.execute(sqlx::query("INSERT INTO t VALUES (1)")).await?; // joins the transaction
///     let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t").fetch_one(&db).await?; // too
///     assert_eq!(n, 1);
///     Ok::<_, sqlx::Error>(())
/// })
/// .await?;
/// # Ok(()) }
/// # #[cfg(not(feature = "sqlite"))] fn main() {}
/// ```
pub struct TxPool<DB: Database> {
    inner: Arc<Inner<DB>>,
}

/// Builds a [`TxPool`] with options; from [`TxPool::builder`].
///
/// ```
/// # #[cfg(feature = "sqlite")]
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
/// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
/// let db = contextflow_sqlx::TxPool::builder(pool).check_on_acquire(false).build();
/// # let _ = db;
/// # Ok(()) }
/// # #[cfg(not(feature = "sqlite"))] fn main() {}
/// ```
#[derive(Debug)]
pub struct TxPoolBuilder<DB: Database> {
    pool: Pool<DB>,
    check_on_acquire: bool,
}

pub(crate) struct Inner<DB: Database> {
    pool: Pool<DB>,
    /// The innermost level (transaction or savepoint) of this pool in the current context.
    /// Never inherited: a transaction belongs to the request that opened it, so a spawned
    /// task, which may run concurrently with it or outlive it, uses the pool.
    current: AsyncLocal<Arc<Level<DB>>>,
    check_on_acquire: bool,
    /// Set for a [`TenantPool`](crate::TenantPool).
    tenant: Option<TenantMode<DB>>,
    parking: Arc<PoolParking>,
}

/// Where a statement runs: the transaction's connection, or one from the pool (in a
/// transaction of its own for a tenant pool).
pub(crate) enum Target<DB: Database> {
    Tx(TxGuard<DB>),
    Pool { tracked: Tracked<DB>, wrapped: bool },
}

// ===== impl TxPool =====

impl<DB: Database> TxPool<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Wraps `pool`, with the default options.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// let pool = sqlx::sqlite::SqlitePoolOptions::new()
    ///     .max_connections(1)
    ///     .connect("sqlite::memory:")
    ///     .await?;
    /// let db = contextflow_sqlx::TxPool::new(pool);
    /// assert!(!db.in_transaction());
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    pub fn new(pool: Pool<DB>) -> Self {
        Self::builder(pool).build()
    }

    /// A builder, to set options before wrapping `pool`.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// let db = contextflow_sqlx::TxPool::builder(pool).check_on_acquire(true).build();
    /// # let _ = db;
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    pub fn builder(pool: Pool<DB>) -> TxPoolBuilder<DB> {
        TxPoolBuilder {
            pool,
            check_on_acquire: true,
        }
    }

    pub(crate) fn with_tenant(
        pool: Pool<DB>,
        check_on_acquire: bool,
        tenant: TenantMode<DB>,
    ) -> Self {
        Self::from_parts(pool, check_on_acquire, Some(tenant))
    }

    fn from_parts(pool: Pool<DB>, check_on_acquire: bool, tenant: Option<TenantMode<DB>>) -> Self {
        TxPool {
            inner: Arc::new(Inner {
                pool,
                current: AsyncLocal::named("contextflow_sqlx.transaction").inherit(Inherit::Never),
                check_on_acquire,
                tenant,
                parking: Arc::default(),
            }),
        }
    }

    /// Runs the future `f` returns inside a transaction that every query through this
    /// `TxPool` in it joins ([`Propagation::Nested`]).
    ///
    /// - Outside a transaction it begins one on a connection from the pool, and **commits**
    ///   when the block returns `Ok`; it **rolls back** when the block returns `Err`, panics
    ///   (the panic then continues), or is dropped before finishing (a client disconnect, a
    ///   timeout, an aborted task): no partial work is ever committed, and the connection
    ///   goes back to the pool only once the server confirmed that no transaction is open on
    ///   it (otherwise it is closed).
    /// - Inside a transaction it opens a **savepoint** instead: `Ok` releases it (its work
    ///   commits or rolls back with the enclosing transaction), `Err`, a panic or a drop roll
    ///   back the savepoint's work only. While a savepoint is open, queries of the enclosing
    ///   level wait for it to end.
    ///
    /// The transaction is bound to the context with [`Inherit::Never`]: tasks spawned inside the
    /// block, even with [`contextflow::spawn`], use the pool (see the crate docs for why).
    /// Queries of one transaction run one at a time: concurrent queries inside the block (a
    /// `join!`) are serialized on the transaction's single connection.
    ///
    /// # Errors
    /// The block's own error; or, converted with `E: From<sqlx::Error>`: an error from
    /// `BEGIN`, `SAVEPOINT`, `COMMIT` or `RELEASE SAVEPOINT` (nothing was committed, or the
    /// savepoint was rolled back); [`CommitUnknown`](crate::CommitUnknown) when the connection
    /// broke during `COMMIT`; [`TransactionClosed`] when the transaction may only be rolled back;
    /// for a [`TenantPool`](crate::TenantPool), [`TenantError`](crate::TenantError).
    ///
    /// # Panics
    /// Resumes the block's panic after rolling back.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// let db = contextflow_sqlx::TxPool::new(pool);
    /// db.execute(sqlx::query("CREATE TABLE t (x INTEGER)")).await?;
    ///
    /// let failed: Result<(), sqlx::Error> = db
    ///     .transaction(|| async {
    ///         db.execute(sqlx::query("INSERT INTO t VALUES (1)")).await?;
    ///         Err(sqlx::Error::RowNotFound) // rolls the insert back
    ///     })
    ///     .await;
    /// assert!(failed.is_err());
    ///
    /// db.transaction(|| async {
    ///     db.execute(sqlx::query("INSERT INTO t VALUES (2)")).await?;
    ///     // A nested block is a savepoint: its failure undoes only its own work.
    ///     let _ = db
    ///         .transaction(|| async {
    ///             db.execute(sqlx::query("INSERT INTO t VALUES (3)")).await?;
    ///             Err::<(), _>(sqlx::Error::RowNotFound)
    ///         })
    ///         .await;
    ///     Ok::<_, sqlx::Error>(())
    /// })
    /// .await?;
    ///
    /// let rows: Vec<(i64,)> = sqlx::query_as("SELECT x FROM t").fetch_all(&db).await?;
    /// assert_eq!(rows, vec![(2,)]);
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    #[track_caller]
    pub fn transaction<'a, F, Fut, T, E>(
        &'a self,
        f: F,
    ) -> impl Future<Output = Result<T, E>> + use<'a, DB, F, Fut, T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<sqlx::Error>,
    {
        let called_at = Location::caller();
        self.run_block(TxOptions::new(), f, called_at)
    }

    /// As [`transaction`](TxPool::transaction), with [`TxOptions`]: a [`Propagation`] mode
    /// and the statement that begins a top-level transaction. A [`Propagation`], a
    /// `&'static str` or a `String` (the begin statement) convert into options.
    ///
    /// # Errors
    /// As [`transaction`](TxPool::transaction); also [`sqlx::Error::BeginFailed`] when the
    /// begin statement is not one, and a [`PropagationError`] when the propagation refuses
    /// to run the block here.
    ///
    /// # Panics
    /// Resumes the block's panic after rolling back.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// let db = contextflow_sqlx::TxPool::new(pool);
    /// db.execute(sqlx::query("CREATE TABLE counter (n INTEGER)")).await?;
    /// db.execute(sqlx::query("INSERT INTO counter VALUES (0)")).await?;
    ///
    /// // Read, then write: with `BEGIN IMMEDIATE` no other writer can slip in between.
    /// db.transaction_with("BEGIN IMMEDIATE", || async {
    ///     let n: i64 = sqlx::query_scalar("SELECT n FROM counter").fetch_one(&db).await?;
    ///     db.execute(sqlx::query("UPDATE counter SET n = $1").bind(n + 1)).await?;
    ///     Ok::<_, sqlx::Error>(())
    /// })
    /// .await?;
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    #[track_caller]
    pub fn transaction_with<'a, O, F, Fut, T, E>(
        &'a self,
        options: O,
        f: F,
    ) -> impl Future<Output = Result<T, E>> + use<'a, DB, O, F, Fut, T, E>
    where
        O: Into<TxOptions>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<sqlx::Error>,
    {
        let called_at = Location::caller();
        self.run_block(options.into(), f, called_at)
    }

    /// Runs `hook` after the current top-level transaction commits, in the context of the
    /// code that opened the transaction (with the transaction itself no longer bound, so
    /// queries in it run on the pool); outside a transaction, runs it now. The place to
    /// publish events about the block's work.
    ///
    /// - Registered inside a savepoint that is later rolled back, the hook is dropped with
    ///   the savepoint's work; released, it moves to the enclosing level.
    /// - On rollback (an `Err`, a panic, a dropped block) hooks are dropped, never run.
    /// - Registered through a snapshot of a block that has ended (committed or not), or whose
    ///   end has begun (its own code returned and the blocks joined to it in other tasks
    ///   ended: it is committing or releasing), a hook is not run, and a line at `warn` says
    ///   so: whether that transaction committed is not known there, and no statement can
    ///   join it any more. Work done through a snapshot in another task belongs in a block
    ///   joined to the transaction (`transaction_with(Propagation::Required, ..)`), whose end
    ///   the transaction waits for, hooks included.
    /// - On a commit whose outcome is unknown ([`CommitUnknown`](crate::CommitUnknown)) they
    ///   are dropped too: the caller gets the error and decides.
    /// - They run one after the other before `transaction` returns; a panicking hook does
    ///   not stop the others, and its panic resumes once they have run.
    /// - On a tokio runtime the `COMMIT` and then the hooks run in a task of their own, so a
    ///   caller that goes away (a client disconnect, a timeout) while `COMMIT` is in flight or
    ///   after it stops neither: the hooks of a transaction that committed always run, and a
    ///   line at `warn` (or `error` when it did not commit) says the caller had gone.
    /// - The transaction a [`Propagation::RequiresNew`](crate::Propagation) block suspended is
    ///   not bound around its hooks either.
    /// - With a [`TenantPool`](crate::TenantPool), a hook registered under another tenant than
    ///   the transaction's (which its statements would refuse) would act for the wrong tenant:
    ///   it is dropped with a line at `error`, and the innermost block (a nested one's
    ///   savepoint, or the transaction) can only roll back: it ends in [`TransactionClosed`].
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// use std::sync::{Arc, Mutex};
    ///
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// let db = contextflow_sqlx::TxPool::new(pool);
    /// let published = Arc::new(Mutex::new(Vec::new()));
    ///
    /// let events = published.clone();
    /// db.transaction(|| async {
    ///     db.after_commit(async move { events.lock().unwrap().push("order.placed") }).await;
    ///     assert!(published.lock().unwrap().is_empty()); // not yet: nothing committed
    ///     Ok::<_, sqlx::Error>(())
    /// })
    /// .await?;
    /// assert_eq!(*published.lock().unwrap(), ["order.placed"]);
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    #[track_caller]
    pub fn after_commit<Fut>(&self, hook: Fut) -> impl Future<Output = ()> + Send + '_
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let called_at = Location::caller();
        async move { self.after_commit_at(hook, called_at).await }
    }

    async fn after_commit_at<Fut>(&self, hook: Fut, called_at: &'static Location<'static>)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(level) = self.inner.current.get() else {
            return hook.await;
        };
        if !level.accepts_hooks() {
            // Checked before the tenant: a level whose end has begun can no longer be made
            // rollback-only, so the wrong-tenant branch below would promise a rollback.
            tracing::warn!(
                target: "contextflow_sqlx",
                "after_commit called in a transaction that has ended: the hook is dropped"
            );
            return;
        }
        if let Err(err) = self.check_tenant_in(&level, called_at) {
            // Registered under another tenant than the block's (which its statements would
            // refuse): run with the block's context, the hook would act for the wrong tenant.
            // It is not run, and the transaction cannot commit, so the event is not lost
            // unnoticed: the block ends in `TransactionClosed` (rollback-only).
            tracing::error!(
                target: "contextflow_sqlx",
                error = %err,
                "after_commit called under another tenant than the transaction's: the hook is \
                 dropped and the transaction will roll back"
            );
            level.set_rollback_only();
            return;
        }
        if level.push_hook(Box::pin(hook)).is_err() {
            // A snapshot of the block's context used after the block ended: whether the
            // transaction committed is not this code's to know, so the hook is not run.
            tracing::warn!(
                target: "contextflow_sqlx",
                "after_commit called in a transaction that has ended: the hook is dropped"
            );
        }
    }

    /// A connection for the queries at hand: the current transaction's, or one from the pool.
    ///
    /// Rarely needed: sqlx's query API runs on `&TxPool` directly
    /// (`sqlx::query_as(..).fetch_all(&db)`). Inside a transaction the [`Conn`] holds the
    /// transaction's only connection until dropped: a query or a nested block of the same task
    /// meanwhile fails at once with [`ConnectionBusy`](crate::ConnectionBusy) (it would wait
    /// forever). Statements run on a `Conn` are invisible to contextflow-sqlx, so before
    /// committing a transaction in which one was used, it checks with the server that the
    /// transaction is still open and healthy (one extra round trip).
    ///
    /// # Errors
    /// The pool's error when it cannot hand out a connection; [`TransactionClosed`] when the
    /// context's transaction has already ended; [`ConnectionBusy`](crate::ConnectionBusy) (see
    /// above); for a [`TenantPool`](crate::TenantPool) outside a transaction, a
    /// [`PropagationError`] (a tenant's queries need one).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// let db = contextflow_sqlx::TxPool::new(pool);
    /// let mut conn = db.acquire().await?;
    /// let answer: i64 = sqlx::query_scalar("SELECT 42").fetch_one(&mut *conn).await?;
    /// assert_eq!(answer, 42);
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    #[track_caller]
    pub fn acquire(&self) -> impl Future<Output = Result<Conn<DB>, sqlx::Error>> + use<'_, DB> {
        let called_at = Location::caller();
        async move {
            match self.inner.current.get() {
                Some(level) => {
                    self.check_tenant_in(&level, called_at)?;
                    let mut guard = level.lock(called_at).await?;
                    guard.mark_raw();
                    let mut parker = guard.parker();
                    parker.park(called_at);
                    Ok(Conn::from_tx(guard, parker))
                }
                None if self.inner.tenant.is_some() => {
                    Err(PropagationError::error(Propagation::Mandatory, called_at))
                }
                None => {
                    let mut tracked = self.acquire_tracked(called_at).await?;
                    // The caller may leave anything behind: check before the next user.
                    tracked.set_phase(Phase::Unverified);
                    Ok(Conn::from_pool(tracked, self.inner.parking.ticket()))
                }
            }
        }
    }

    /// Executes `query` on the current transaction, or on the pool outside one.
    ///
    /// # Errors
    /// The query's error, or [`acquire`](TxPool::acquire)'s (for a
    /// [`TenantPool`](crate::TenantPool) outside a transaction, a
    /// [`TenantError`](crate::TenantError) when no tenant is bound instead).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// # let db = contextflow_sqlx::TxPool::new(pool);
    /// use sqlx::sqlite::SqliteQueryResult;
    /// db.execute(sqlx::query("CREATE TABLE t (x INTEGER)")).await?;
    /// let done: SqliteQueryResult = db.execute(sqlx::query("INSERT INTO t VALUES (?)").bind(7)).await?;
    /// assert_eq!(done.rows_affected(), 1);
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    #[track_caller]
    pub fn execute<'a, 'q, Q>(
        &'a self,
        query: Q,
    ) -> impl Future<Output = Result<DB::QueryResult, sqlx::Error>> + use<'a, 'q, DB, Q>
    where
        Q: Execute<'q, DB> + 'q,
    {
        let called_at = Location::caller();
        async move {
            let mut target = self.target(called_at).await?.in_flight();
            let result = target.conn().execute(query).await;
            target.complete(result).await
        }
    }

    /// Runs `query` on the current transaction (or the pool) and returns its one row.
    ///
    /// # Errors
    /// [`sqlx::Error::RowNotFound`] when there is no row; otherwise as
    /// [`execute`](TxPool::execute).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// # let db = contextflow_sqlx::TxPool::new(pool);
    /// use sqlx::Row;
    /// let row = db.fetch_one(sqlx::query("SELECT 6 * 7 AS n")).await?;
    /// assert_eq!(row.get::<i64, _>("n"), 42);
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    #[track_caller]
    pub fn fetch_one<'a, 'q, Q>(
        &'a self,
        query: Q,
    ) -> impl Future<Output = Result<DB::Row, sqlx::Error>> + use<'a, 'q, DB, Q>
    where
        Q: Execute<'q, DB> + 'q,
    {
        let called_at = Location::caller();
        async move {
            let mut target = self.target(called_at).await?.in_flight();
            let result = target.conn().fetch_one(query).await;
            // No row is an answer, not a failure of the transaction.
            match result {
                Err(sqlx::Error::RowNotFound) => {
                    target.complete(Ok(())).await?;
                    Err(sqlx::Error::RowNotFound)
                }
                result => target.complete(result).await,
            }
        }
    }

    /// Runs `query` on the current transaction (or the pool) and returns its first row, if any.
    ///
    /// # Errors
    /// As [`execute`](TxPool::execute).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// # let db = contextflow_sqlx::TxPool::new(pool);
    /// let none = db.fetch_optional(sqlx::query("SELECT 1 WHERE 1 = 0")).await?;
    /// assert!(none.is_none());
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    #[track_caller]
    pub fn fetch_optional<'a, 'q, Q>(
        &'a self,
        query: Q,
    ) -> impl Future<Output = Result<Option<DB::Row>, sqlx::Error>> + use<'a, 'q, DB, Q>
    where
        Q: Execute<'q, DB> + 'q,
    {
        let called_at = Location::caller();
        self.fetch_optional_at(query, called_at)
    }

    /// Runs `query` on the current transaction (or the pool) and returns all its rows.
    ///
    /// # Errors
    /// As [`execute`](TxPool::execute).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// # let db = contextflow_sqlx::TxPool::new(pool);
    /// let rows = db.fetch_all(sqlx::query("SELECT 1 UNION ALL SELECT 2")).await?;
    /// assert_eq!(rows.len(), 2);
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    #[track_caller]
    pub fn fetch_all<'a, 'q, Q>(
        &'a self,
        query: Q,
    ) -> impl Future<Output = Result<Vec<DB::Row>, sqlx::Error>> + use<'a, 'q, DB, Q>
    where
        Q: Execute<'q, DB> + 'q,
    {
        let called_at = Location::caller();
        async move {
            let mut target = self.target(called_at).await?.in_flight();
            let result = target.conn().fetch_all(query).await;
            target.complete(result).await
        }
    }

    pub(crate) async fn fetch_optional_at<'q, Q>(
        &self,
        query: Q,
        called_at: &'static Location<'static>,
    ) -> Result<Option<DB::Row>, sqlx::Error>
    where
        Q: Execute<'q, DB> + 'q,
    {
        let mut target = self.target(called_at).await?.in_flight();
        let result = target.conn().fetch_optional(query).await;
        target.complete(result).await
    }

    /// Where a statement of the current context runs.
    pub(crate) async fn target(
        &self,
        called_at: &'static Location<'static>,
    ) -> Result<Target<DB>, sqlx::Error> {
        if let Some(level) = self.inner.current.get() {
            self.check_tenant_in(&level, called_at)?;
            return Ok(Target::Tx(level.lock(called_at).await?));
        }
        match &self.inner.tenant {
            None => {
                let mut tracked = self.acquire_tracked(called_at).await?;
                // If this statement's future is dropped half-way, check the connection.
                tracked.set_phase(Phase::Unverified);
                Ok(Target::Pool {
                    tracked,
                    wrapped: false,
                })
            }
            Some(mode) => {
                // Row-level security needs the tenant set, and a transaction-local setting
                // needs a transaction: the statement gets one of its own.
                let tenant = mode.require(called_at)?;
                let tracked = self
                    .acquire_begun("BEGIN", Some(&tenant), called_at)
                    .await?;
                Ok(Target::Pool {
                    tracked,
                    wrapped: true,
                })
            }
        }
    }

    /// A connection from the pool inside a transaction opened with `begin`, with the tenant's
    /// setting made for it in tenant mode. On PostgreSQL `begin` and the setting are one round
    /// trip ([`Tracked::begin_pg`]), the acquire check too for a tenant after a plain `BEGIN`
    /// ([`dialect::can_follow_check`]); elsewhere, one each.
    async fn acquire_begun(
        &self,
        begin: &str,
        tenant: Option<&str>,
        called_at: &'static Location<'static>,
    ) -> Result<Tracked<DB>, sqlx::Error> {
        let setting = match (&self.inner.tenant, tenant) {
            (Some(mode), Some(tenant)) => Some((mode.setting(), tenant)),
            _ => None,
        };
        let attempts = self.acquire_attempts(called_at)?;
        // The acquire check goes in the message when it may (`can_follow_check`), else before.
        let check_apart =
            self.inner.check_on_acquire && !dialect::can_follow_check(begin, setting.is_some());
        let mut message = None;
        let mut last_error = None;
        for _ in 0..attempts {
            let mut tracked = Tracked::new(self.inner.pool.acquire().await?);
            if tracked.dialect() != Dialect::Postgres {
                let Some(mut tracked) = self.checked(tracked, &mut last_error).await? else {
                    continue;
                };
                tracked.begin(begin).await?;
                if let (Some(mode), Some(tenant)) = (&self.inner.tenant, tenant) {
                    mode.set(&mut tracked, tenant).await?;
                }
                return Ok(tracked);
            }
            if check_apart {
                let Some(checked) = self.checked(tracked, &mut last_error).await? else {
                    continue;
                };
                tracked = checked;
            }
            let message = match &message {
                Some(message) => message,
                None => message.insert(dialect::pg_begin_message(
                    begin,
                    self.inner.check_on_acquire && !check_apart,
                    setting,
                )?),
            };
            let Err(err) = tracked.begin_pg(message).await else {
                return Ok(tracked);
            };
            match PgBeginFailure::of(&err) {
                // Dropped in `Phase::Begin`: rolled back and verified before reuse.
                PgBeginFailure::Refused => return Err(err),
                PgBeginFailure::InTransaction => close_in_transaction(tracked),
                PgBeginFailure::Broken => close_broken(tracked, &err),
            }
            last_error = Some(err);
        }
        Err(no_connection(last_error))
    }

    /// How many connections to take from the pool before giving up; an error at once when this
    /// task already holds as many as the pool has (it would wait for itself).
    fn acquire_attempts(&self, called_at: &'static Location<'static>) -> Result<u32, sqlx::Error> {
        let max = self.inner.pool.options().get_max_connections();
        if self.inner.parking.count(crate::state::Owner::current()) >= max as usize {
            return Err(crate::error::ConnectionBusy::pool_exhausted(called_at));
        }
        // Each refused connection is closed, so the pool opens fresh ones: a few attempts
        // always get through unless the server itself is unusable.
        Ok(max.saturating_add(1))
    }

    /// A connection from the pool, checked with the server unless the check is off.
    async fn acquire_tracked(
        &self,
        called_at: &'static Location<'static>,
    ) -> Result<Tracked<DB>, sqlx::Error> {
        let attempts = self.acquire_attempts(called_at)?;
        let mut last_error = None;
        for _ in 0..attempts {
            let tracked = Tracked::new(self.inner.pool.acquire().await?);
            if let Some(tracked) = self.checked(tracked, &mut last_error).await? {
                return Ok(tracked);
            }
        }
        Err(no_connection(last_error))
    }

    /// `tracked`, fresh from the pool, checked with the server unless the check is off: `None`
    /// when it was inside a transaction or broken (closed, the error in `last_error`).
    async fn checked(
        &self,
        mut tracked: Tracked<DB>,
        last_error: &mut Option<sqlx::Error>,
    ) -> Result<Option<Tracked<DB>>, sqlx::Error> {
        if !self.inner.check_on_acquire || !tracked.dialect().can_check() {
            return Ok(Some(tracked));
        }
        match tracked.check_idle().await {
            Ok(TxStatus::Idle) => Ok(Some(tracked)),
            Ok(TxStatus::RolledBack) => {
                // SQLite: the check's ROLLBACK ended the leftover transaction, and SQLite
                // keeps no other session state worth distrusting.
                tracing::warn!(
                    target: "contextflow_sqlx",
                    "the pool handed out a SQLite connection inside a transaction: rolled back"
                );
                Ok(Some(tracked))
            }
            Ok(TxStatus::Open) => {
                close_in_transaction(tracked);
                Ok(None)
            }
            Err(err) => {
                close_broken(tracked, &err);
                *last_error = Some(err);
                Ok(None)
            }
        }
    }

    async fn run_block<F, Fut, T, E>(
        &self,
        options: TxOptions,
        f: F,
        called_at: &'static Location<'static>,
    ) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<sqlx::Error>,
    {
        let begin = options.checked_begin().map_err(E::from)?;
        let current = self.inner.current.get();
        match (options.get_propagation(), current) {
            (Propagation::Never, Some(_)) | (Propagation::Mandatory, None) => Err(E::from(
                PropagationError::error(options.get_propagation(), called_at),
            )),
            (Propagation::Never, None) => f().await,
            (Propagation::RequiresNew, Some(_)) => {
                // The suspended transaction keeps its connection meanwhile.
                let _suspended = self.inner.parking.ticket();
                self.root(begin, f, called_at).await
            }
            (Propagation::Required | Propagation::Mandatory, Some(level)) => {
                self.check_tenant_in(&level, called_at).map_err(E::from)?;
                join(&level, f).await
            }
            (Propagation::Nested, Some(level)) => self.savepoint(&level, f, called_at).await,
            (_, None) => self.root(begin, f, called_at).await,
        }
    }

    async fn root<F, Fut, T, E>(
        &self,
        begin: &str,
        f: F,
        called_at: &'static Location<'static>,
    ) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<sqlx::Error>,
    {
        let tenant = match &self.inner.tenant {
            Some(mode) => Some(mode.require(called_at).map_err(E::from)?),
            None => None,
        };
        let tracked = self
            .acquire_begun(begin, tenant.as_deref(), called_at)
            .await?;
        let shared = Arc::new(Shared::new(tracked, tenant));
        // From here until `disarm`, dropping this future ends the transaction at once.
        let mut guard = RootGuard::new(shared.clone());
        let level = Arc::new(Level::root(shared.clone()));
        let body = self
            .inner
            .current
            .scope(level.clone(), async move { f().await });
        // The block's state is dropped before the rollback and not used after it, so
        // observing it half-updated after a panic is impossible.
        let outcome = AssertUnwindSafe(body).catch_unwind().await;
        // Before a commit, a savepoint the block opened in another task (with its context)
        // ends first: its work is committed only if it was released. A rollback does not wait.
        let committing = matches!(outcome, Ok(Ok(_))) && !level.is_rollback_only();
        let taken = if committing {
            match level.idle(called_at).await {
                Ok(idle) => {
                    // No joined block runs now; one joined from here on can run no statement
                    // of this transaction, so its hooks are refused (they would run after the
                    // commit for work that never happened). A task that uses a snapshot of the
                    // block outside any block of its own is not waited for: a hook it
                    // registers from now on is refused too, as one registered after the
                    // commit always was (register hooks in the block or a block joined to it).
                    level.seal_hooks();
                    let taken = shared.take(called_at).await;
                    drop(idle);
                    taken
                }
                Err(err) => Err(err),
            }
        } else {
            shared.take(called_at).await
        };
        let taken = match taken {
            Ok(taken) => {
                guard.disarm();
                taken
            }
            // A `Conn` of this task escaped the block and holds the connection: nothing is
            // committed. The transaction ends now for every other user (a snapshot of this
            // context gets `TransactionClosed`), and the guard takes the connection out (rolled
            // back) as soon as the `Conn` lets go of it.
            Err(err) => {
                level.mark_ended();
                drop(guard);
                return match outcome {
                    Ok(Ok(_)) => Err(E::from(err)),
                    Ok(Err(block_err)) => Err(block_err),
                    Err(panic) => resume_unwind(panic),
                };
            }
        };
        if !committing {
            // Rolled back: the hooks go with it, and a hook registered from now on is refused.
            drop(level.take_hooks());
        }
        match outcome {
            Ok(Ok(_)) if level.is_rollback_only() => {
                taken.rollback().await;
                Err(E::from(TransactionClosed::error(
                    ClosedReason::RollbackOnly,
                )))
            }
            // With hooks to run, the commit and the hooks go on in a task of their own: a
            // caller dropped while `COMMIT` is in flight must not take the hooks of a
            // transaction that did commit with it.
            Ok(Ok(value)) if level.has_hooks() && tokio::runtime::Handle::try_current().is_ok() => {
                self.commit_then_hooks(taken, level)
                    .await
                    .map_err(E::from)?;
                Ok(value)
            }
            Ok(Ok(value)) => match taken.commit().await {
                Ok(()) => {
                    let hooks = level.take_hooks();
                    if !hooks.is_empty() {
                        self.after_commit_run(hooks).await;
                    }
                    Ok(value)
                }
                Err(err) => Err(E::from(err.into_error())),
            },
            Ok(Err(err)) => {
                taken.rollback().await;
                Err(err)
            }
            Err(panic) => {
                taken.rollback().await;
                resume_unwind(panic)
            }
        }
    }

    /// Commits `taken` and runs `level`'s hooks, in a task of its own (on a tokio runtime):
    /// the caller waits for it, but dropping the caller (a client disconnect, a timeout) with
    /// `COMMIT` in flight stops neither the commit nor, once it is done, the hooks. The task
    /// carries the block's context without its transactions, like
    /// [`after_commit_run`](Self::after_commit_run), and the current `tracing` span. It logs an
    /// unknown outcome itself (so that the line is written whether or not the caller is still
    /// there to take the error), and the outcome when the caller has gone. A hook's panic
    /// reaches the caller.
    async fn commit_then_hooks(
        &self,
        taken: Taken<DB>,
        level: Arc<Level<DB>>,
    ) -> Result<(), sqlx::Error> {
        let run = Arc::new(CommitRun {
            stage: AtomicU8::new(CommitRun::NOT_STARTED),
            hooks: StdMutex::new(VecDeque::new()),
        });
        let waiting = CallerWaiting(Arc::new(AtomicBool::new(true)));
        let task = {
            let run = run.clone();
            let caller = waiting.0.clone();
            contextflow::spawn(
                async move {
                    run.stage.store(CommitRun::COMMITTING, Ordering::Release);
                    if let Err(err) = taken.commit().await {
                        // An unknown outcome is logged by `into_error`, whoever takes the error;
                        // any other failure is the caller's to report, or logged here when the
                        // caller has gone.
                        let unknown = matches!(err, CommitError::Unknown(_));
                        let err = err.into_error();
                        if !caller.load(Ordering::Acquire) {
                            if unknown {
                                // The error itself is logged by `into_error`.
                                tracing::warn!(
                                    target: "contextflow_sqlx",
                                    "the transaction's caller went away during COMMIT, whose \
                                     outcome is unknown: its after-commit hooks are dropped"
                                );
                            } else {
                                tracing::error!(
                                    target: "contextflow_sqlx",
                                    error = %err,
                                    "the transaction's caller went away during COMMIT, which did \
                                     not commit: its after-commit hooks are dropped"
                                );
                            }
                        }
                        return Err(err);
                    }
                    run.hooks
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .extend(level.take_hooks());
                    run.stage.store(CommitRun::COMMITTED, Ordering::Release);
                    if !caller.load(Ordering::Acquire) {
                        tracing::warn!(
                            target: "contextflow_sqlx",
                            "the transaction's caller went away during COMMIT, which committed: \
                             its after-commit hooks run"
                        );
                    }
                    run_queued_hooks(&run.hooks).await;
                    Ok(())
                }
                .instrument(tracing::Span::current()),
            )
        };
        let result = match task.await {
            Ok(result) => result,
            Err(err) if err.is_panic() => resume_unwind(err.into_panic()),
            // Cancelled: the runtime is shutting down.
            Err(_) => match run.stage.load(Ordering::Acquire) {
                // Hooks the task had not started are run here.
                CommitRun::COMMITTED => {
                    let rest: Vec<Hook> = run
                        .hooks
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .drain(..)
                        .collect();
                    self.inner.current.unset(run_hooks(rest)).await;
                    Ok(())
                }
                // Dropped before it sent anything: the transaction was rolled back with it.
                CommitRun::NOT_STARTED => Err(sqlx::Error::Protocol(
                    "not committed: the task that was to run COMMIT was cancelled before it \
                     started (the runtime is shutting down); the transaction was rolled back"
                        .into(),
                )),
                _ => Err(CommitError::Unknown(sqlx::Error::Protocol(
                    "the task running COMMIT was cancelled (the runtime is shutting down)".into(),
                ))
                .into_error()),
            },
        };
        drop(waiting);
        result
    }

    /// Runs a committed block's hooks, outside every transaction (for `RequiresNew`, the
    /// suspended one is still bound around the block, and the hooks' queries belong on the
    /// pool), in a task of their own: a caller that goes away once the commit is done (a client
    /// disconnect, a timeout) does not take the remaining hooks with it. `contextflow::spawn`
    /// carries the block's context, without its transactions (`Inherit::Never`); a hook's panic
    /// reaches the caller as before.
    async fn after_commit_run(&self, hooks: Vec<Hook>) {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.inner.current.unset(run_hooks(hooks)).await;
        }
        // The task takes the hooks one at a time; a task cancelled before it ran them all (the
        // runtime shutting down) leaves the rest here, for this caller to run.
        let queue = Arc::new(StdMutex::new(VecDeque::from(hooks)));
        let task = contextflow::spawn({
            let queue = queue.clone();
            async move { run_queued_hooks(&queue).await }.instrument(tracing::Span::current())
        });
        match task.await {
            Ok(()) => {}
            Err(err) if err.is_panic() => resume_unwind(err.into_panic()),
            Err(_) => {
                let rest: Vec<Hook> = queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .drain(..)
                    .collect();
                if !rest.is_empty() {
                    self.inner.current.unset(run_hooks(rest)).await;
                }
            }
        }
    }

    async fn savepoint<F, Fut, T, E>(
        &self,
        parent: &Arc<Level<DB>>,
        f: F,
        called_at: &'static Location<'static>,
    ) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<sqlx::Error>,
    {
        self.check_tenant_in(parent, called_at).map_err(E::from)?;
        // `guard` rolls the savepoint back if this future is dropped before it ends.
        let (level, guard) = parent.savepoint(called_at).await?;
        let level = Arc::new(level);
        let body = self
            .inner
            .current
            .scope(level.clone(), async move { f().await });
        // As in `root`: the block's state is gone before anything else runs.
        let outcome = AssertUnwindSafe(body).catch_unwind().await;
        match outcome {
            Ok(Ok(_)) if level.is_rollback_only() => {
                guard.rollback(called_at).await;
                Err(E::from(TransactionClosed::error(
                    ClosedReason::RollbackOnly,
                )))
            }
            Ok(Ok(value)) => {
                // As the top level does before its commit: a savepoint this block opened in
                // another task ends first (releasing ours would fold its unfinished work into
                // the enclosing level, and on to the commit).
                let idle = match level.idle(called_at).await {
                    Ok(idle) => idle,
                    Err(err) => {
                        guard.rollback(called_at).await;
                        return Err(E::from(err));
                    }
                };
                // As in `root`: a block joined from here on cannot reach this savepoint's work.
                level.seal_hooks();
                // A block joined to this level in another task may have failed meanwhile.
                if level.is_rollback_only() {
                    drop(idle);
                    guard.rollback(called_at).await;
                    return Err(E::from(TransactionClosed::error(
                        ClosedReason::RollbackOnly,
                    )));
                }
                // The hooks move to the parent while the savepoint still holds it: released
                // first, the parent's end could take its hooks before these arrive.
                guard
                    .release(called_at, || {
                        for hook in level.take_hooks() {
                            if parent.push_hook(hook).is_err() {
                                // The enclosing level ended meanwhile (a `Conn` kept past its
                                // block ended the transaction): nothing will commit.
                                tracing::warn!(
                                    target: "contextflow_sqlx",
                                    "after-commit hook of a released savepoint dropped: its \
                                     transaction has ended"
                                );
                            }
                        }
                    })
                    .await?;
                drop(idle);
                Ok(value)
            }
            Ok(Err(err)) => {
                guard.rollback(called_at).await;
                Err(err)
            }
            Err(panic) => {
                guard.rollback(called_at).await;
                resume_unwind(panic)
            }
        }
    }

    /// Inside a tenant pool's transaction, the context's tenant must be the transaction's.
    fn check_tenant_in(
        &self,
        level: &Level<DB>,
        called_at: &'static Location<'static>,
    ) -> Result<(), sqlx::Error> {
        match (&self.inner.tenant, level.shared.tenant()) {
            (Some(mode), Some(tenant)) => mode.check_same(tenant, called_at),
            _ => Ok(()),
        }
    }
}

impl<DB: Database> TxPool<DB> {
    /// The sqlx pool underneath, for what must bypass the context's transaction: queries
    /// on it never join the transaction, and are not checked or tracked by contextflow-sqlx.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// let db = contextflow_sqlx::TxPool::new(pool);
    /// assert_eq!(db.pool().options().get_max_connections(), 1);
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    pub fn pool(&self) -> &Pool<DB> {
        &self.inner.pool
    }

    /// Whether the current context is inside a transaction of this `TxPool`.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// let db = contextflow_sqlx::TxPool::new(pool);
    /// assert!(!db.in_transaction());
    /// db.transaction(|| async {
    ///     assert!(db.in_transaction());
    ///     Ok::<_, sqlx::Error>(())
    /// })
    /// .await?;
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    pub fn in_transaction(&self) -> bool {
        self.inner.current.is_set()
    }

    /// How deep the current context is nested: 0 outside a transaction, 1 inside one, 2 inside
    /// a savepoint within it, and so on.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// let db = contextflow_sqlx::TxPool::new(pool);
    /// let depths = db
    ///     .transaction(|| async {
    ///         let inner = db.transaction(|| async { Ok::<_, sqlx::Error>(db.transaction_depth()) });
    ///         Ok::<_, sqlx::Error>((db.transaction_depth(), inner.await?))
    ///     })
    ///     .await?;
    /// assert_eq!((db.transaction_depth(), depths), (0, (1, 2)));
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    pub fn transaction_depth(&self) -> usize {
        self.inner
            .current
            .with(|level| level.map_or(0, |l| l.depth))
    }
}

impl<DB: Database> Clone for TxPool<DB> {
    fn clone(&self) -> Self {
        TxPool {
            inner: self.inner.clone(),
        }
    }
}

impl<DB: Database> From<Pool<DB>> for TxPool<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    fn from(pool: Pool<DB>) -> Self {
        TxPool::new(pool)
    }
}

impl<DB: Database> fmt::Debug for TxPool<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxPool")
            .field("pool", &self.inner.pool)
            .field("transaction_depth", &self.transaction_depth())
            .field("check_on_acquire", &self.inner.check_on_acquire)
            .field("tenant_scoped", &self.inner.tenant.is_some())
            .finish()
    }
}

/// Closes a connection the pool handed out inside a transaction (which closing ends).
fn close_in_transaction<DB: Database>(tracked: Tracked<DB>)
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    tracing::warn!(
        target: "contextflow_sqlx",
        database = tracked.dialect().name(),
        "the pool handed out a connection inside a transaction: closed it"
    );
    tracked.close();
}

/// Closes a connection that failed its check.
fn close_broken<DB: Database>(tracked: Tracked<DB>, err: &sqlx::Error)
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    tracing::debug!(target: "contextflow_sqlx", error = %err, "a pooled connection failed its check: closed it");
    tracked.close();
}

/// The error when every connection the pool handed out was refused.
fn no_connection(last_error: Option<sqlx::Error>) -> sqlx::Error {
    last_error.unwrap_or_else(|| {
        sqlx::Error::Protocol(
            "every connection the pool handed out was inside a transaction".into(),
        )
    })
}

// ===== impl TxPoolBuilder =====

impl<DB: Database> TxPoolBuilder<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Whether to check each connection taken from the pool with the server (default: on).
    ///
    /// A connection inside a transaction is closed and another taken, so no request's work
    /// ever joins a transaction left open by someone else. On PostgreSQL a
    /// [`TenantPool`](crate::TenantPool)'s check travels with the `BEGIN` of a transaction (one
    /// message); otherwise it costs one round trip per acquire (on SQLite, a call to its worker
    /// thread). It also finds broken connections, so
    /// with it on, sqlx's own ping (`PoolOptions::test_before_acquire`) can be turned off,
    /// which makes the net cost zero. Connections that contextflow-sqlx releases after a
    /// transaction never need it: it returns them to the pool only once the server confirmed
    /// them idle. A statement run on the pool outside a block is not examined afterwards, so
    /// one that opens a transaction itself (`db.execute("BEGIN")`, a multi-statement
    /// `raw_sql`) leaves its connection inside it: keep the check on unless nothing does that,
    /// and nothing else uses the sqlx pool.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// let pool = sqlx::sqlite::SqlitePoolOptions::new()
    ///     .max_connections(1)
    ///     .test_before_acquire(false) // the check also finds broken connections
    ///     .connect("sqlite::memory:")
    ///     .await?;
    /// let db = contextflow_sqlx::TxPool::builder(pool).check_on_acquire(true).build();
    /// # let _ = db;
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    pub fn check_on_acquire(mut self, check: bool) -> Self {
        self.check_on_acquire = check;
        self
    }

    /// The [`TxPool`].
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// let db = contextflow_sqlx::TxPool::builder(pool).build();
    /// assert_eq!(db.transaction_depth(), 0);
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    pub fn build(self) -> TxPool<DB> {
        TxPool::from_parts(self.pool, self.check_on_acquire, None)
    }
}

// ===== impl Target =====

impl<DB: Database> Target<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// The connection to run the statement on.
    pub(crate) fn conn(&mut self) -> &mut DB::Connection {
        match self {
            Target::Tx(guard) => guard.conn(),
            Target::Pool { tracked, .. } => tracked.raw(),
        }
    }

    pub(crate) fn dialect(&mut self) -> Dialect {
        match self {
            Target::Tx(guard) => guard.dialect(),
            Target::Pool { tracked, .. } => tracked.dialect(),
        }
    }

    /// Ends the statement: records a failure in the transaction, or commits (rolls back) the
    /// statement's own transaction.
    pub(crate) async fn complete<T>(
        mut self,
        result: Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let failure = match &result {
            Ok(_) => None,
            Err(err) => Some(Failure::of(self.dialect(), err)),
        };
        self.end(failure).await?;
        result
    }

    /// A statement's future holds the target from now until [`complete`](Target::complete):
    /// a transaction's target dropped before that (the caller gave up on the statement)
    /// poisons the transaction, since the statement may have run.
    pub(crate) fn in_flight(mut self) -> Self {
        self.arm();
        self
    }

    /// As [`in_flight`](Target::in_flight), for a row stream: the flag to clear at its first
    /// item (`None` outside a transaction).
    pub(crate) fn arm(&mut self) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        match self {
            Target::Tx(guard) => Some(guard.arm()),
            Target::Pool { .. } => None,
        }
    }

    /// As [`complete`](Target::complete), when the error went elsewhere (a stream).
    pub(crate) async fn end(self, failure: Option<Failure>) -> Result<(), sqlx::Error> {
        match self {
            Target::Tx(mut guard) => {
                guard.disarm();
                if let Some(failure) = failure {
                    guard.note_failure(failure);
                }
                Ok(())
            }
            Target::Pool {
                mut tracked,
                wrapped: false,
            } => {
                // The statement has run (or the server refused it): nothing is in flight. A
                // broken connection stays unverified, so it is checked (and closed).
                if failure.is_none_or(|f| f.from_server) {
                    tracked.set_phase(Phase::Idle);
                }
                Ok(())
            }
            Target::Pool {
                mut tracked,
                wrapped: true,
            } => {
                if failure.is_some() {
                    // The statement's error is the one to report.
                    let _ = tracked.rollback().await;
                    return Ok(());
                }
                match tracked.commit(false).await {
                    Ok(()) => Ok(()),
                    Err(err) => {
                        let _ = tracked.rollback().await;
                        Err(err.into_error())
                    }
                }
            }
        }
    }
}

/// A block joined to `level` (`REQUIRED`, `MANDATORY` inside a transaction): its failure
/// marks the level rollback-only.
async fn join<DB, F, Fut, T, E>(level: &Level<DB>, f: F) -> Result<T, E>
where
    DB: Database,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    /// Marks the level unless disarmed: covers `Err`, panics and a dropped future alike.
    struct Mark<'a, DB: Database>(Option<&'a Level<DB>>);
    impl<DB: Database> Drop for Mark<'_, DB> {
        fn drop(&mut self) {
            if let Some(level) = self.0 {
                level.set_rollback_only();
            }
        }
    }
    // Declared before `mark`, so dropped after it: the level's end, which waits for this
    // block, sees its mark.
    let _running = level.joined();
    let mut mark = Mark(Some(level));
    let result = f().await;
    if result.is_ok() {
        mark.0 = None;
    }
    result
}

/// What [`TxPool::commit_then_hooks`]'s task shares with its caller: how far it got, and the
/// hooks not started yet.
struct CommitRun {
    /// [`NOT_STARTED`](Self::NOT_STARTED), [`COMMITTING`](Self::COMMITTING) or
    /// [`COMMITTED`](Self::COMMITTED).
    stage: AtomicU8,
    hooks: StdMutex<VecDeque<Hook>>,
}

impl CommitRun {
    const NOT_STARTED: u8 = 0;
    const COMMITTING: u8 = 1;
    const COMMITTED: u8 = 2;
}

/// Held by the caller of [`TxPool::commit_then_hooks`] while it waits: `false` once the
/// caller has gone (dropped, or done).
struct CallerWaiting(Arc<AtomicBool>);

impl Drop for CallerWaiting {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Runs the hooks of `queue`, taking each out as it starts, as [`run_hooks`] does: a task
/// cancelled half-way leaves the rest in `queue`.
async fn run_queued_hooks(queue: &StdMutex<VecDeque<Hook>>) {
    let mut first_panic = None;
    loop {
        let next = queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front();
        let Some(hook) = next else { break };
        if let Err(panic) = AssertUnwindSafe(hook).catch_unwind().await {
            tracing::error!(target: "contextflow_sqlx", "an after-commit hook panicked");
            first_panic.get_or_insert(panic);
        }
    }
    if let Some(panic) = first_panic {
        resume_unwind(panic);
    }
}

/// Runs after-commit hooks in order; resumes the first panic once all have run.
async fn run_hooks(hooks: Vec<Hook>) {
    let mut first_panic = None;
    for hook in hooks {
        if let Err(panic) = AssertUnwindSafe(hook).catch_unwind().await {
            tracing::error!(target: "contextflow_sqlx", "an after-commit hook panicked");
            first_panic.get_or_insert(panic);
        }
    }
    if let Some(panic) = first_panic {
        resume_unwind(panic);
    }
}
