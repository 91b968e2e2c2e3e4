//! Which database a connection talks to, and the few statements whose text or meaning differ.
//!
//! Everything contextflow-sqlx sends itself (`BEGIN`, `COMMIT`, `ROLLBACK`, `SAVEPOINT`,
//! `RELEASE SAVEPOINT`, `ROLLBACK TO SAVEPOINT`) is the same SQL on PostgreSQL, MySQL/MariaDB
//! and SQLite. What differs is how to ask the server whether a transaction is open: sqlx reads
//! that from the protocol but does not expose it, so [`in_transaction`] asks in SQL (or through
//! `begin_with`, which reports the protocol's own status).

use std::any::Any as StdAny;

use sqlx::{Connection, Database, Executor};

/// The database behind a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Postgres,
    MySql,
    Sqlite,
    /// A driver we do not know: no server-side checks, and a connection dropped in any state
    /// but idle is closed rather than rolled back.
    Other,
}

/// What the server says about a connection's transaction.
#[derive(Debug)]
pub(crate) enum TxStatus {
    /// No transaction open.
    Idle,
    /// A transaction is open (and, on PostgreSQL, not aborted).
    Open,
    /// SQLite only: a transaction was open and the check rolled it back.
    RolledBack,
}

// ===== impl Dialect =====

impl Dialect {
    /// The dialect of `conn`; for sqlx's `Any` driver, of the database behind it.
    pub(crate) fn of<DB: Database>(conn: &mut DB::Connection) -> Dialect {
        match DB::NAME {
            "Any" => match (conn as &mut dyn StdAny).downcast_mut::<sqlx::AnyConnection>() {
                Some(any) => Dialect::from_name(any.backend_name()),
                None => Dialect::Other,
            },
            name => Dialect::from_name(name),
        }
    }

    fn from_name(name: &str) -> Dialect {
        match name {
            "PostgreSQL" => Dialect::Postgres,
            "MySQL" => Dialect::MySql,
            "SQLite" => Dialect::Sqlite,
            _ => Dialect::Other,
        }
    }

    /// Whether the server can tell us if a transaction is open.
    pub(crate) fn can_check(self) -> bool {
        self != Dialect::Other
    }

    /// The name sqlx gives this database.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "PostgreSQL",
            Dialect::MySql => "MySQL",
            Dialect::Sqlite => "SQLite",
            Dialect::Other => "an unknown database",
        }
    }
}

/// Asks the server whether `conn` is inside a transaction. Drains whatever a dropped statement
/// left in flight first (sqlx does that before every statement), so the answer is about the
/// connection as the next user would find it.
///
/// - PostgreSQL: `now()` is the start of the transaction and `statement_timestamp()` the start
///   of the statement; they are equal exactly when the statement is the first of its
///   transaction, which for a simple-protocol query outside a transaction block it always is.
///   Inside a block the `BEGIN` came at least one network round trip earlier. In an aborted
///   block the query fails (`25P02`): an error, like any other failure here.
/// - MySQL/MariaDB: `begin_with("DO 0")` makes sqlx read `SERVER_STATUS_IN_TRANS` from the
///   OK packet. A "transaction" it opens is given back to sqlx, which queues its `ROLLBACK`.
/// - SQLite: `ROLLBACK` succeeds exactly when a transaction is open (and ends it).
///
/// # Errors
/// Any error: the caller cannot trust the connection and closes it.
pub(crate) async fn in_transaction<DB: Database>(
    conn: &mut DB::Connection,
    dialect: Dialect,
) -> Result<TxStatus, sqlx::Error>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    match dialect {
        Dialect::Postgres => {
            let sql = sqlx::raw_sql("SELECT 1 WHERE now() <> statement_timestamp()");
            let row = (&mut *conn).fetch_optional(sql).await?;
            Ok(if row.is_some() {
                TxStatus::Open
            } else {
                TxStatus::Idle
            })
        }
        Dialect::MySql => match conn.begin_with("DO 0").await {
            Ok(tx) => {
                drop(tx);
                Ok(TxStatus::Open)
            }
            Err(sqlx::Error::BeginFailed) => Ok(TxStatus::Idle),
            Err(err) => Err(err),
        },
        Dialect::Sqlite => match (&mut *conn).execute("ROLLBACK").await {
            Ok(_) => Ok(TxStatus::RolledBack),
            Err(err) if is_sqlite_no_transaction(&err) => Ok(TxStatus::Idle),
            Err(err) => Err(err),
        },
        Dialect::Other => Ok(TxStatus::Idle),
    }
}

/// SQLite's answer to `ROLLBACK` or `COMMIT` outside a transaction.
pub(crate) fn is_sqlite_no_transaction(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db.message().contains("no transaction is active"),
        _ => false,
    }
}

/// SQLite's answer to `BEGIN` inside a transaction.
pub(crate) fn is_sqlite_nested_begin(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db
            .message()
            .contains("cannot start a transaction within a transaction"),
        _ => false,
    }
}

/// Whether `err`, from a statement inside a transaction, means the database rolled the whole
/// transaction back by itself: MySQL/MariaDB do so on a deadlock (error 1213, SQLSTATE
/// `40001`), and then run the statements that follow in autocommit mode.
pub(crate) fn rolled_back_by_server(dialect: Dialect, err: &sqlx::Error) -> bool {
    match (dialect, err) {
        (Dialect::MySql, sqlx::Error::Database(db)) => db.code().as_deref() == Some("40001"),
        _ => false,
    }
}
