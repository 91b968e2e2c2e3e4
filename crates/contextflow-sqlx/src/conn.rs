//! [`Conn`]: the connection a query runs on.

use std::{
    fmt,
    ops::{Deref, DerefMut},
};

use sqlx::{pool::PoolConnection, Database};
use tokio::sync::{OwnedMappedMutexGuard, OwnedMutexGuard};

use crate::{error::TransactionClosed, state::TxConn};

/// A connection for the queries at hand: the current transaction's, or one from the pool.
///
/// Returned by [`TxPool::acquire`](crate::TxPool::acquire). It dereferences to the driver's
/// connection (`PgConnection`, `SqliteConnection`), so any sqlx query runs on `&mut *conn`.
///
/// Inside a transaction it holds the transaction's connection exclusively: other queries of the
/// same transaction wait until it is dropped. Drop it before starting a nested
/// [`transaction`](crate::TxPool::transaction) or another query through the [`TxPool`](crate::TxPool)
/// in the same task, which would otherwise wait for it forever.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
/// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
/// let db = contextflow_sqlx::TxPool::new(pool);
/// let mut conn = db.acquire().await?;
/// assert!(!conn.in_transaction());
/// let (n,): (i64,) = sqlx::query_as("SELECT 41 + 1").fetch_one(&mut *conn).await?;
/// assert_eq!(n, 42);
/// # Ok(()) }
/// ```
pub struct Conn<DB: Database> {
    inner: Inner<DB>,
}

enum Inner<DB: Database> {
    Pool(PoolConnection<DB>),
    Tx {
        conn: OwnedMappedMutexGuard<TxConn<DB>, DB::Connection>,
        /// The level's `busy` lock; declared after `conn`, so released after it.
        _busy: OwnedMutexGuard<()>,
    },
}

// ===== impl Conn =====

impl<DB: Database> Conn<DB> {
    pub(crate) fn from_pool(conn: PoolConnection<DB>) -> Self {
        Conn {
            inner: Inner::Pool(conn),
        }
    }

    pub(crate) fn from_tx(
        guard: OwnedMutexGuard<TxConn<DB>>,
        busy: OwnedMutexGuard<()>,
    ) -> Result<Self, sqlx::Error> {
        match OwnedMutexGuard::try_map(guard, |c| c.tx.as_deref_mut()) {
            Ok(conn) => Ok(Conn {
                inner: Inner::Tx { conn, _busy: busy },
            }),
            Err(_) => Err(TransactionClosed::ended()),
        }
    }

    /// Whether this is the current transaction's connection (rather than one from the pool).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// let db = contextflow_sqlx::TxPool::new(pool);
    /// let inside = db
    ///     .transaction(|| async { Ok::<_, sqlx::Error>(db.acquire().await?.in_transaction()) })
    ///     .await?;
    /// assert!(inside);
    /// # Ok(()) }
    /// ```
    pub fn in_transaction(&self) -> bool {
        matches!(self.inner, Inner::Tx { .. })
    }
}

impl<DB: Database> Deref for Conn<DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        match &self.inner {
            Inner::Pool(conn) => conn,
            Inner::Tx { conn, .. } => conn,
        }
    }
}

impl<DB: Database> DerefMut for Conn<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        match &mut self.inner {
            Inner::Pool(conn) => conn,
            Inner::Tx { conn, .. } => conn,
        }
    }
}

impl<DB: Database> fmt::Debug for Conn<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("database", &DB::NAME)
            .field("in_transaction", &self.in_transaction())
            .finish_non_exhaustive()
    }
}
