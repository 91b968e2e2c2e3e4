//! [`Tracked`]: a pooled connection that knows whether it may go back to the pool.
//!
//! contextflow-sqlx runs the transaction protocol itself (`BEGIN`, `COMMIT`, `ROLLBACK` as plain
//! statements) instead of through sqlx's `Transaction`, and records in a [`Phase`] what it has
//! sent. Only a connection in [`Phase::Idle`] (no transaction, nothing of ours in flight) goes
//! back to the pool when dropped. In any other phase, dropping it hands it to a background
//! task that drains what is in flight, rolls back, checks with the server that no transaction
//! is open and only then releases it; if that fails, times out, or there is no runtime to run
//! it, the connection is closed, which ends any transaction on the server. A queued
//! `ROLLBACK` is never trusted on its own.

use std::{panic::AssertUnwindSafe, time::Duration};

use contextflow::{FutureExt as _, Snapshot};
use futures_util::FutureExt as _;
use sqlx::{pool::PoolConnection, Connection as _, Database, Executor};

use crate::{
    dialect::{self, Dialect, TxStatus},
    error::{ClosedReason, CommitUnknown, TransactionClosed},
};

/// How long the background clean-up of an abandoned connection may take before it is closed.
const RESCUE_TIMEOUT: Duration = Duration::from_secs(5);

/// A pooled connection whose transaction state contextflow-sqlx tracks.
pub(crate) struct Tracked<DB: Database> {
    /// `None` only while being dropped or closed.
    conn: Option<PoolConnection<DB>>,
    phase: Phase,
    dialect: Dialect,
    /// What dropping does outside [`Phase::Idle`]; a function pointer so that `Drop` needs no
    /// `Executor` bounds (it is instantiated where they hold).
    abandon: fn(PoolConnection<DB>, Dialect, Phase),
}

/// What contextflow-sqlx knows about a connection's server-side state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// No transaction open, nothing in flight: safe to reuse.
    Idle,
    /// Outside a transaction, but a statement may be in flight or user code had the raw
    /// connection: check before reuse.
    Unverified,
    /// `BEGIN` sent, answer not seen.
    Begin,
    /// Inside a transaction.
    Open,
    /// `COMMIT` sent, answer not seen: the outcome is unknown until the connection is examined.
    Commit,
    /// `COMMIT` may be in flight in a way that examining the connection cannot resolve: it is
    /// closed and the outcome reported unknown.
    CommitBlind,
    /// `ROLLBACK` sent, answer not seen.
    Rollback,
}

/// Why a commit did not happen, or may not have.
#[derive(Debug)]
pub(crate) enum CommitError {
    /// The server refused the `COMMIT`, or the check before it found the transaction failed:
    /// nothing was committed.
    Refused(sqlx::Error),
    /// The transaction had already ended, or may only be rolled back.
    Closed(ClosedReason),
    /// The `COMMIT` was sent and no answer came.
    Unknown(sqlx::Error),
}

// ===== impl Tracked =====

impl<DB: Database> Tracked<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Tracks `conn`, fresh from the pool: assumed idle until the caller checks it.
    pub(crate) fn new(mut conn: PoolConnection<DB>) -> Self {
        let dialect = Dialect::of::<DB>(&mut conn);
        Tracked {
            conn: Some(conn),
            phase: Phase::Idle,
            dialect,
            abandon: abandon::<DB>,
        }
    }

    /// Asks the server whether a transaction is open; the connection stays
    /// [`Phase::Unverified`] unless the answer is "idle".
    pub(crate) async fn check_idle(&mut self) -> Result<TxStatus, sqlx::Error> {
        self.phase = Phase::Unverified;
        let dialect = self.dialect;
        let status = dialect::in_transaction::<DB>(self.raw(), dialect).await?;
        if !matches!(status, TxStatus::Open) {
            self.phase = Phase::Idle;
        }
        Ok(status)
    }

    /// Opens a transaction with `statement` (`BEGIN`, or a variant of it).
    pub(crate) async fn begin(&mut self, statement: &str) -> Result<(), sqlx::Error> {
        self.phase = Phase::Begin;
        self.raw().execute(statement).await?;
        self.phase = Phase::Open;
        Ok(())
    }

    /// PostgreSQL: sends `message`, made by [`dialect::pg_begin_message`] (the acquire check,
    /// the begin statement, the tenant's setting), as one simple-protocol message, which the
    /// server runs in order, stopping at the first error (see
    /// [`PgBeginFailure`](dialect::PgBeginFailure) for what an error means).
    pub(crate) async fn begin_pg(&mut self, message: &str) -> Result<(), sqlx::Error> {
        debug_assert_eq!(self.dialect, Dialect::Postgres);
        self.phase = Phase::Begin;
        self.raw().execute(sqlx::raw_sql(message)).await?;
        self.phase = Phase::Open;
        Ok(())
    }

    /// Runs one statement of ours (a savepoint command) inside the transaction.
    pub(crate) async fn exec(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        debug_assert_eq!(self.phase, Phase::Open);
        self.raw().execute(sql).await.map(drop)
    }

    /// Commits. With `verify`, first checks that the transaction is still open and healthy
    /// (after a failed statement or raw access by user code).
    pub(crate) async fn commit(&mut self, verify: bool) -> Result<(), CommitError> {
        let result = if verify && self.dialect == Dialect::MySql {
            // sqlx reads the server's "in transaction" flag after `DO 0` and hands back a
            // `Transaction` it believes it opened: committing that is our COMMIT (dropping it
            // would queue a ROLLBACK). If this is dropped half-way, sqlx may have queued that
            // ROLLBACK behind a COMMIT that was or was not sent: the outcome cannot be told
            // apart afterwards, so the connection is closed and the outcome reported unknown.
            self.phase = Phase::CommitBlind;
            let committed = match self.raw().begin_with("DO 0").await {
                Ok(tx) => Ok(Some(tx.commit().await)),
                Err(sqlx::Error::BeginFailed) => Ok(None),
                Err(err) => Err(err),
            };
            match committed {
                Ok(Some(result)) => result,
                Ok(None) => {
                    self.phase = Phase::Idle;
                    return Err(CommitError::Closed(ClosedReason::EndedOutside));
                }
                // `DO 0` failed: the COMMIT was not sent.
                Err(err) => {
                    self.phase = Phase::Open;
                    return Err(CommitError::Refused(err));
                }
            }
        } else {
            if verify {
                match self.verify_open().await {
                    Ok(true) => {}
                    Ok(false) => return Err(CommitError::Closed(ClosedReason::EndedOutside)),
                    Err(err) => return Err(CommitError::Refused(err)),
                }
            }
            self.phase = Phase::Commit;
            self.raw().execute("COMMIT").await.map(drop)
        };
        match result {
            Ok(()) => {
                self.phase = Phase::Idle;
                Ok(())
            }
            // The server answered: nothing was committed. PostgreSQL and MySQL end the
            // transaction; SQLite may keep it open (SQLITE_BUSY). The caller rolls back.
            Err(err @ sqlx::Error::Database(_)) => {
                self.phase = Phase::Open;
                Err(CommitError::Refused(err))
            }
            Err(err) => Err(CommitError::Unknown(err)),
        }
    }

    /// Whether the transaction is still open and usable (PostgreSQL, SQLite).
    pub(crate) async fn verify_open(&mut self) -> Result<bool, sqlx::Error> {
        match self.dialect {
            Dialect::Postgres => {
                let dialect = self.dialect;
                match dialect::in_transaction::<DB>(self.raw(), dialect).await? {
                    TxStatus::Open => Ok(true),
                    _ => {
                        self.phase = Phase::Idle;
                        Ok(false)
                    }
                }
            }
            Dialect::Sqlite => match self.raw().execute("BEGIN").await {
                Err(err) if dialect::is_sqlite_nested_begin(&err) => Ok(true),
                Err(err) => Err(err),
                Ok(_) => {
                    // The transaction was gone and this opened a new, empty one.
                    self.rollback().await?;
                    Ok(false)
                }
            },
            Dialect::MySql | Dialect::Other => Ok(true),
        }
    }

    /// Rolls back. On success the connection is idle; on failure it stays as it was, and
    /// dropping it cleans it up or closes it.
    pub(crate) async fn rollback(&mut self) -> Result<(), sqlx::Error> {
        self.phase = Phase::Rollback;
        match self.raw().execute("ROLLBACK").await {
            Ok(_) => {}
            Err(err) if dialect::is_sqlite_no_transaction(&err) => {}
            Err(err) => return Err(err),
        }
        self.phase = Phase::Idle;
        Ok(())
    }
}

impl<DB: Database> Tracked<DB> {
    /// The driver's connection.
    pub(crate) fn raw(&mut self) -> &mut DB::Connection {
        match self.conn.as_mut() {
            Some(conn) => conn,
            // `conn` is only taken in `Drop` and `close`, which consume the value.
            None => unreachable!("a Tracked connection is used after being dropped"),
        }
    }

    /// The driver's connection, shared.
    pub(crate) fn raw_ref(&self) -> &DB::Connection {
        match self.conn.as_ref() {
            Some(conn) => conn,
            // As in `raw`.
            None => unreachable!("a Tracked connection is used after being dropped"),
        }
    }

    pub(crate) fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub(crate) fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
    }

    /// Closes the connection instead of returning it to the pool.
    pub(crate) fn close(mut self) {
        if let Some(conn) = self.conn.take() {
            close(conn);
        }
    }
}

impl<DB: Database> Drop for Tracked<DB> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.phase == Phase::Idle {
            drop(conn); // back to the pool
        } else {
            (self.abandon)(conn, self.dialect, self.phase);
        }
    }
}

// ===== impl CommitError =====

impl CommitError {
    /// The error the block's caller gets; logs an unknown outcome (in the caller's context).
    pub(crate) fn into_error(self) -> sqlx::Error {
        match self {
            CommitError::Refused(err) => err,
            CommitError::Closed(reason) => TransactionClosed::error(reason),
            CommitError::Unknown(err) => {
                tracing::error!(
                    target: "contextflow_sqlx",
                    error = %err,
                    "COMMIT sent but its answer was lost: the transaction may or may not have committed"
                );
                CommitUnknown::error(err)
            }
        }
    }
}

/// Dropping a connection that is not known to be idle: clean it up in the background, or
/// close it.
fn abandon<DB: Database>(conn: PoolConnection<DB>, dialect: Dialect, phase: Phase)
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    if phase == Phase::CommitBlind {
        tracing::error!(
            target: "contextflow_sqlx",
            "transaction dropped while its COMMIT was in flight: outcome unknown; connection closed"
        );
        return close(conn);
    }
    if phase == Phase::Commit {
        tracing::warn!(
            target: "contextflow_sqlx",
            "transaction dropped while its COMMIT was in flight: outcome unknown until the \
             connection is examined"
        );
    } else {
        tracing::debug!(target: "contextflow_sqlx", ?phase, "connection dropped inside a transaction: rolling back");
    }
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if dialect.can_check() => {
            // The clean-up logs in the context of the code that dropped the connection (minus
            // what a spawn does not inherit, such as the transaction itself).
            let task = rescue(conn, dialect, phase).with_snapshot(Snapshot::capture_inheritable());
            drop(handle.spawn(task));
        }
        _ => close(conn),
    }
}

/// Drains, rolls back and checks an abandoned connection; releases it only once the server
/// says no transaction is open.
async fn rescue<DB: Database>(conn: PoolConnection<DB>, dialect: Dialect, phase: Phase)
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    // If this task is dropped before the end (runtime shutting down), the connection is closed.
    let mut guard = CloseOnDrop(Some(conn));
    // A driver left in an inconsistent state by the drop may panic (sqlx-mysql does): the
    // connection is then closed like any other that cannot be cleaned up.
    let settle = AssertUnwindSafe(settle::<DB>(guard.raw(), dialect)).catch_unwind();
    let settled = match tokio::time::timeout(RESCUE_TIMEOUT, settle).await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(_panic)) => Ok(Err(sqlx::Error::Protocol(
            "the driver panicked while the connection was rolled back".into(),
        ))),
        Err(elapsed) => Err(elapsed),
    };
    match settled {
        Ok(Ok(was_open)) => {
            if phase == Phase::Commit {
                if was_open {
                    tracing::warn!(target: "contextflow_sqlx", "dropped COMMIT resolved: rolled back (the COMMIT never reached the server)");
                } else {
                    tracing::warn!(target: "contextflow_sqlx", "dropped COMMIT resolved: committed");
                }
            }
            guard.release();
        }
        Ok(Err(err)) => {
            if phase == Phase::Commit && matches!(err, sqlx::Error::Database(_)) {
                tracing::warn!(target: "contextflow_sqlx", error = %err, "dropped COMMIT resolved: rolled back (the server refused it)");
            } else if phase == Phase::Commit {
                tracing::error!(target: "contextflow_sqlx", error = %err, "dropped COMMIT: outcome unknown; connection closed");
            } else {
                tracing::warn!(target: "contextflow_sqlx", error = %err, ?phase, "could not roll back an abandoned connection: closed");
            }
        }
        Err(_) => {
            if phase == Phase::Commit {
                tracing::error!(target: "contextflow_sqlx", "dropped COMMIT: outcome unknown; connection closed after a timeout");
            } else {
                tracing::warn!(target: "contextflow_sqlx", ?phase, "rolling back an abandoned connection timed out: closed");
            }
        }
    }
}

/// Rolls back whatever is open; `Ok(true)` when a transaction was open.
async fn settle<DB: Database>(
    conn: &mut DB::Connection,
    dialect: Dialect,
) -> Result<bool, sqlx::Error>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    let status = match dialect::in_transaction::<DB>(conn, dialect).await {
        // PostgreSQL: a transaction an error aborted refuses the check; it is open, and a
        // ROLLBACK ends it like any other (checked below).
        Err(sqlx::Error::Database(db))
            if dialect == Dialect::Postgres && db.code().as_deref() == Some("25P02") =>
        {
            TxStatus::Open
        }
        status => status?,
    };
    match status {
        TxStatus::Idle => Ok(false),
        TxStatus::RolledBack => Ok(true),
        TxStatus::Open => {
            (&mut *conn).execute("ROLLBACK").await?;
            match dialect::in_transaction::<DB>(conn, dialect).await? {
                TxStatus::Idle => Ok(true),
                _ => Err(sqlx::Error::Protocol(
                    "still inside a transaction after ROLLBACK".into(),
                )),
            }
        }
    }
}

/// Closes the connection when dropped, unless released.
struct CloseOnDrop<DB: Database>(Option<PoolConnection<DB>>);

impl<DB: Database> CloseOnDrop<DB> {
    fn raw(&mut self) -> &mut DB::Connection {
        match self.0.as_mut() {
            Some(conn) => conn,
            // Only `release` and `Drop` take the connection, and both consume the guard.
            None => unreachable!("CloseOnDrop used after release"),
        }
    }

    fn release(mut self) {
        drop(self.0.take()); // back to the pool
    }
}

impl<DB: Database> Drop for CloseOnDrop<DB> {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            close(conn);
        }
    }
}

/// Closes `conn` without returning it to the pool. With a runtime, sqlx closes it gracefully
/// in a task; without one, the socket (or SQLite handle) is dropped, which the server sees as
/// the end of the session: either way any open transaction is rolled back by the server.
fn close<DB: Database>(mut conn: PoolConnection<DB>) {
    if tokio::runtime::Handle::try_current().is_ok() {
        conn.close_on_drop();
        drop(conn);
    } else {
        drop(conn.detach());
    }
}
