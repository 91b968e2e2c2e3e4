//! [`Conn`]: the connection a query runs on.

use std::{
    fmt,
    ops::{Deref, DerefMut},
};

use sqlx::Database;

use crate::{
    state::{ParkTicket, Parker, TxGuard},
    tracked::Tracked,
};

/// A connection for the queries at hand: the current transaction's, or one from the pool.
///
/// Returned by [`TxPool::acquire`](crate::TxPool::acquire). It dereferences to the driver's
/// connection (`PgConnection`, `SqliteConnection`, `MySqlConnection`), so any sqlx query runs
/// on `&mut *conn`. Most code does not need one: sqlx's query API runs on `&TxPool` directly.
///
/// Inside a transaction it holds the transaction's connection exclusively: while it is alive,
/// another query, a row stream or a nested [`transaction`](crate::TxPool::transaction) of the
/// same task fails at once with [`ConnectionBusy`](crate::ConnectionBusy) (waiting would
/// never end), and those of other tasks sharing the context wait. Outside a transaction it is
/// a pool connection, checked with the server when it is given back.
///
/// ```
/// # #[cfg(feature = "sqlite")]
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
/// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
/// let db = contextflow_sqlx::TxPool::new(pool);
/// let mut conn = db.acquire().await?;
/// assert!(!conn.in_transaction());
/// let (n,): (i64,) = sqlx::query_as("SELECT 41 + 1").fetch_one(&mut *conn).await?;
/// assert_eq!(n, 42);
/// # Ok(()) }
/// # #[cfg(not(feature = "sqlite"))] fn main() {}
/// ```
pub struct Conn<DB: Database> {
    inner: Inner<DB>,
}

enum Inner<DB: Database> {
    Pool {
        tracked: Tracked<DB>,
        _ticket: ParkTicket,
    },
    Tx {
        /// Declared before `guard`, so the record is cleared before the connection is released.
        _parker: Parker<DB>,
        guard: TxGuard<DB>,
    },
}

// ===== impl Conn =====

impl<DB: Database> Conn<DB> {
    pub(crate) fn from_pool(tracked: Tracked<DB>, ticket: ParkTicket) -> Self {
        Conn {
            inner: Inner::Pool {
                tracked,
                _ticket: ticket,
            },
        }
    }

    pub(crate) fn from_tx(guard: TxGuard<DB>, parker: Parker<DB>) -> Self {
        Conn {
            inner: Inner::Tx {
                _parker: parker,
                guard,
            },
        }
    }

    /// Whether this is the current transaction's connection (rather than one from the pool).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// let db = contextflow_sqlx::TxPool::new(pool);
    /// let inside = db
    ///     .transaction(|| async { Ok::<_, sqlx::Error>(db.acquire().await?.in_transaction()) })
    ///     .await?;
    /// assert!(inside);
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    pub fn in_transaction(&self) -> bool {
        matches!(self.inner, Inner::Tx { .. })
    }
}

impl<DB: Database> Deref for Conn<DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        match &self.inner {
            Inner::Pool { tracked, .. } => tracked.raw_ref(),
            Inner::Tx { guard, .. } => guard.conn_ref(),
        }
    }
}

impl<DB: Database> DerefMut for Conn<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        match &mut self.inner {
            Inner::Pool { tracked, .. } => tracked.raw(),
            Inner::Tx { guard, .. } => guard.conn(),
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
