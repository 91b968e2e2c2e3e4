//! [`TxPool`]: a pool whose queries join the transaction of the current context.

use std::{
    borrow::Cow,
    fmt,
    future::Future,
    panic::{resume_unwind, AssertUnwindSafe},
    sync::Arc,
};

use contextflow::{AsyncLocal, Inherit};
use futures_util::FutureExt as _;
use sqlx::{Database, Execute, Executor, Pool};

use crate::{
    conn::Conn,
    state::{Level, RootGuard, Shared},
};

/// A sqlx [`Pool`] whose queries use the transaction of the current context, if there is one.
///
/// [`transaction`](TxPool::transaction) runs a block in a transaction bound to the context;
/// [`execute`](TxPool::execute), the `fetch_*` methods and [`acquire`](TxPool::acquire) run
/// on that transaction inside such a block, and on the pool outside it. Repository code
/// therefore never takes a transaction parameter.
///
/// Cloning is cheap and clones share the transaction: build one `TxPool` per database at
/// start-up and hand clones to the repositories. Two `TxPool`s built separately are
/// independent, even over the same sqlx pool: neither sees the other's transaction.
///
/// ```
/// use contextflow_sqlx::TxPool;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
/// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
/// let db = TxPool::new(pool);
/// db.execute(sqlx::query("CREATE TABLE t (x INTEGER)")).await?;
///
/// db.transaction(|| async {
///     db.execute(sqlx::query("INSERT INTO t VALUES (1)")).await?; // joins the transaction
///     Ok::<_, sqlx::Error>(())
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub struct TxPool<DB: Database> {
    inner: Arc<Inner<DB>>,
}

struct Inner<DB: Database> {
    pool: Pool<DB>,
    /// The innermost level (transaction or savepoint) of this pool in the current context.
    /// Never inherited: a transaction belongs to the request that opened it, so a spawned
    /// task, which may run concurrently with it or outlive it, uses the pool.
    current: AsyncLocal<Arc<Level<DB>>>,
}

// ===== impl TxPool =====

impl<DB: Database> TxPool<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Wraps `pool`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// let pool = sqlx::sqlite::SqlitePoolOptions::new()
    ///     .max_connections(1)
    ///     .connect("sqlite::memory:")
    ///     .await?;
    /// let db = contextflow_sqlx::TxPool::new(pool);
    /// assert!(!db.in_transaction());
    /// # Ok(()) }
    /// ```
    pub fn new(pool: Pool<DB>) -> Self {
        TxPool {
            inner: Arc::new(Inner {
                pool,
                current: AsyncLocal::named("contextflow_sqlx::transaction").inherit(Inherit::Never),
            }),
        }
    }

    /// The wrapped pool. Queries run on it directly never join a transaction.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// let db = contextflow_sqlx::TxPool::new(pool);
    /// let (one,): (i64,) = sqlx::query_as("SELECT 1").fetch_one(db.pool()).await?;
    /// assert_eq!(one, 1);
    /// # Ok(()) }
    /// ```
    pub fn pool(&self) -> &Pool<DB> {
        &self.inner.pool
    }

    /// Whether a transaction of this pool is bound to the current context.
    ///
    /// ```
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
    /// ```
    pub fn in_transaction(&self) -> bool {
        self.inner.current.is_set()
    }

    /// How deep the current context is nested: 0 outside a transaction, 1 inside one, 2 inside
    /// a savepoint within it, and so on.
    ///
    /// ```
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
    /// ```
    pub fn transaction_depth(&self) -> usize {
        self.inner
            .current
            .with(|level| level.map_or(0, |l| l.depth))
    }

    /// Runs the future `f` returns inside a transaction that every query through this
    /// `TxPool` in it joins.
    ///
    /// - Outside a transaction it begins one on a connection from the pool, and **commits**
    ///   when the block returns `Ok`; it **rolls back** when the block returns `Err`, panics
    ///   (the panic then continues), or is dropped before finishing (a client disconnect, a
    ///   timeout, an aborted task): no partial work is ever committed.
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
    /// The block's own error; or, converted with `E: From<sqlx::Error>`, an error from
    /// `BEGIN`, `SAVEPOINT`, `COMMIT` or `RELEASE SAVEPOINT`. When the commit (or release)
    /// fails, nothing was committed (or the savepoint was rolled back).
    ///
    /// # Panics
    /// Resumes the block's panic after rolling back.
    ///
    /// ```
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
    /// let rows: Vec<(i64,)> = sqlx::query_as("SELECT x FROM t").fetch_all(db.pool()).await?;
    /// assert_eq!(rows, vec![(2,)]);
    /// # Ok(()) }
    /// ```
    pub async fn transaction<F, Fut, T, E>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<sqlx::Error>,
    {
        match self.inner.current.get() {
            None => self.root_transaction(None, f).await,
            Some(parent) => self.savepoint(&parent, f).await,
        }
    }

    /// As [`transaction`](TxPool::transaction), but a top-level transaction is opened with
    /// `statement` instead of `BEGIN`: `BEGIN ISOLATION LEVEL SERIALIZABLE` or
    /// `BEGIN READ ONLY` on PostgreSQL, `BEGIN IMMEDIATE` on SQLite (take the write lock at
    /// once, so a block that reads before it writes cannot fail to upgrade its lock).
    ///
    /// Inside a transaction, `statement` does not apply (the enclosing transaction's mode
    /// holds) and a savepoint is opened exactly as with [`transaction`](TxPool::transaction),
    /// so a service that asks for a mode still composes into a larger unit of work.
    ///
    /// # Errors
    /// As [`transaction`](TxPool::transaction); also [`sqlx::Error::BeginFailed`] when
    /// `statement` does not open a transaction.
    ///
    /// # Panics
    /// Resumes the block's panic after rolling back.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// let db = contextflow_sqlx::TxPool::new(pool);
    /// db.execute(sqlx::query("CREATE TABLE counter (n INTEGER)")).await?;
    /// db.execute(sqlx::query("INSERT INTO counter VALUES (0)")).await?;
    ///
    /// // Read, then write: with `BEGIN IMMEDIATE` no other writer can slip in between.
    /// db.transaction_with("BEGIN IMMEDIATE", || async {
    ///     let n: i64 = sqlx::query_scalar("SELECT n FROM counter")
    ///         .fetch_one(&mut *db.acquire().await?)
    ///         .await?;
    ///     db.execute(sqlx::query("UPDATE counter SET n = $1").bind(n + 1)).await?;
    ///     Ok::<_, sqlx::Error>(())
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub async fn transaction_with<F, Fut, T, E>(
        &self,
        statement: impl Into<Cow<'static, str>>,
        f: F,
    ) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<sqlx::Error>,
    {
        match self.inner.current.get() {
            None => self.root_transaction(Some(statement.into()), f).await,
            Some(parent) => self.savepoint(&parent, f).await,
        }
    }

    /// A connection for the queries at hand: the current transaction's, or one from the pool.
    ///
    /// Use it for what the shortcut methods do not cover (`query_as`, `query_scalar`,
    /// streams). Inside a transaction, the [`Conn`] holds the transaction's connection until
    /// dropped; keep it for the queries at hand only (see [`Conn`]).
    ///
    /// # Errors
    /// The pool's error when it cannot hand out a connection; [`TransactionClosed`]
    /// (as a [`sqlx::Error::Io`]) when the context's transaction has already ended.
    ///
    /// [`TransactionClosed`]: crate::TransactionClosed
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// let db = contextflow_sqlx::TxPool::new(pool);
    /// let mut conn = db.acquire().await?;
    /// let answer: i64 = sqlx::query_scalar("SELECT 42").fetch_one(&mut *conn).await?;
    /// assert_eq!(answer, 42);
    /// # Ok(()) }
    /// ```
    pub async fn acquire(&self) -> Result<Conn<DB>, sqlx::Error> {
        match self.inner.current.get() {
            Some(level) => level.acquire().await,
            None => Ok(Conn::from_pool(self.inner.pool.acquire().await?)),
        }
    }

    /// Executes `query` on the current transaction, or on the pool outside one.
    ///
    /// # Errors
    /// The query's error, or [`acquire`](TxPool::acquire)'s.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// # let db = contextflow_sqlx::TxPool::new(pool);
    /// use sqlx::sqlite::SqliteQueryResult;
    /// db.execute(sqlx::query("CREATE TABLE t (x INTEGER)")).await?;
    /// let done: SqliteQueryResult = db.execute(sqlx::query("INSERT INTO t VALUES (?)").bind(7)).await?;
    /// assert_eq!(done.rows_affected(), 1);
    /// # Ok(()) }
    /// ```
    pub async fn execute<'q, Q>(&self, query: Q) -> Result<DB::QueryResult, sqlx::Error>
    where
        Q: Execute<'q, DB> + 'q,
    {
        let mut conn = self.acquire().await?;
        conn.execute(query).await
    }

    /// Runs `query` on the current transaction (or the pool) and returns its one row.
    ///
    /// # Errors
    /// [`sqlx::Error::RowNotFound`] when there is no row; the query's error, or
    /// [`acquire`](TxPool::acquire)'s.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// # let db = contextflow_sqlx::TxPool::new(pool);
    /// use sqlx::Row;
    /// let row = db.fetch_one(sqlx::query("SELECT 6 * 7 AS n")).await?;
    /// assert_eq!(row.get::<i64, _>("n"), 42);
    /// # Ok(()) }
    /// ```
    pub async fn fetch_one<'q, Q>(&self, query: Q) -> Result<DB::Row, sqlx::Error>
    where
        Q: Execute<'q, DB> + 'q,
    {
        let mut conn = self.acquire().await?;
        conn.fetch_one(query).await
    }

    /// Runs `query` on the current transaction (or the pool) and returns its first row, if any.
    ///
    /// # Errors
    /// The query's error, or [`acquire`](TxPool::acquire)'s.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// # let db = contextflow_sqlx::TxPool::new(pool);
    /// let none = db.fetch_optional(sqlx::query("SELECT 1 WHERE 1 = 0")).await?;
    /// assert!(none.is_none());
    /// # Ok(()) }
    /// ```
    pub async fn fetch_optional<'q, Q>(&self, query: Q) -> Result<Option<DB::Row>, sqlx::Error>
    where
        Q: Execute<'q, DB> + 'q,
    {
        let mut conn = self.acquire().await?;
        conn.fetch_optional(query).await
    }

    /// Runs `query` on the current transaction (or the pool) and returns all its rows.
    ///
    /// # Errors
    /// The query's error, or [`acquire`](TxPool::acquire)'s.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// # let db = contextflow_sqlx::TxPool::new(pool);
    /// let rows = db.fetch_all(sqlx::query("SELECT 1 UNION ALL SELECT 2")).await?;
    /// assert_eq!(rows.len(), 2);
    /// # Ok(()) }
    /// ```
    pub async fn fetch_all<'q, Q>(&self, query: Q) -> Result<Vec<DB::Row>, sqlx::Error>
    where
        Q: Execute<'q, DB> + 'q,
    {
        let mut conn = self.acquire().await?;
        conn.fetch_all(query).await
    }

    async fn root_transaction<F, Fut, T, E>(
        &self,
        begin: Option<Cow<'static, str>>,
        f: F,
    ) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<sqlx::Error>,
    {
        let tx = match begin {
            None => self.inner.pool.begin().await?,
            Some(statement) => self.inner.pool.begin_with(statement).await?,
        };
        let shared = Arc::new(Shared::new(tx));
        // From here until `disarm`, dropping this future rolls the transaction back.
        let mut guard = RootGuard::new(shared.clone());
        let level = Arc::new(Level::root(shared.clone()));
        let body = self.inner.current.scope(level, async move { f().await });
        // The block's state is dropped before the rollback and not used after it, so
        // observing it half-updated after a panic is impossible.
        let outcome = AssertUnwindSafe(body).catch_unwind().await;
        let taken = shared.take().await;
        guard.disarm();
        match outcome {
            Ok(Ok(value)) => taken.commit().await.map(|()| value).map_err(E::from),
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

    async fn savepoint<F, Fut, T, E>(&self, parent: &Level<DB>, f: F) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<sqlx::Error>,
    {
        // `guard` rolls the savepoint back if this future is dropped before it ends.
        let (level, guard) = parent.savepoint().await?;
        let body = self
            .inner
            .current
            .scope(Arc::new(level), async move { f().await });
        // As in `root_transaction`: the block's state is gone before anything else runs.
        let outcome = AssertUnwindSafe(body).catch_unwind().await;
        match outcome {
            Ok(Ok(value)) => guard.release().await.map(|()| value).map_err(E::from),
            Ok(Err(err)) => {
                guard.rollback().await;
                Err(err)
            }
            Err(panic) => {
                guard.rollback().await;
                resume_unwind(panic)
            }
        }
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
        let depth = self
            .inner
            .current
            .with(|level| level.map_or(0, |l| l.depth));
        f.debug_struct("TxPool")
            .field("pool", &self.inner.pool)
            .field("transaction_depth", &depth)
            .finish()
    }
}
