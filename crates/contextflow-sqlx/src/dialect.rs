//! Which database a connection talks to, and the few statements whose text or meaning differ.
//!
//! Everything contextflow-sqlx sends itself (`BEGIN`, `COMMIT`, `ROLLBACK`, `SAVEPOINT`,
//! `RELEASE SAVEPOINT`, `ROLLBACK TO SAVEPOINT`) is the same SQL on PostgreSQL, MySQL/MariaDB
//! and SQLite. What differs is how to ask the server whether a transaction is open: sqlx reads
//! that from the protocol but does not expose it, so [`in_transaction`] asks in SQL (or through
//! `begin_with`, which reports the protocol's own status).

use std::{any::Any as StdAny, fmt::Write as _};

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

/// The text of the error [`PG_FAIL_IN_TRANSACTION`] raises.
const PG_IN_TRANSACTION_MARKER: &str = "contextflow-sqlx: connection inside a transaction";

/// PostgreSQL: a statement that fails when the connection is inside a transaction block and
/// returns nothing otherwise, for the front of a message that then begins one. The test is
/// [`in_transaction`]'s (`now()` is the transaction's start, `statement_timestamp()` the
/// message's); the failure is a cast of a text naming contextflow-sqlx to `int`, evaluated
/// only when the test is true, so the server's error says what happened. Nothing after it in
/// the message runs: no `BEGIN` reaches a connection that is already in a transaction.
///
/// It goes in front only where [`can_follow_check`] says so.
pub(crate) const PG_FAIL_IN_TRANSACTION: &str = "SELECT ('contextflow-sqlx: connection inside \
     a transaction since ' || now()::text)::int WHERE now() <> statement_timestamp()";

/// Whether the acquire check may go in the message that opens a transaction with `begin`.
/// The check is a query, so it is the transaction's first: it takes the transaction's
/// snapshot, after which PostgreSQL refuses an isolation level (`BEGIN ISOLATION LEVEL ...`,
/// or `SET TRANSACTION ...` as the block's first statement: `25001`). So it rides along only
/// when a query comes first anyway: a tenant's `set_config`, after a plain `BEGIN`. Otherwise
/// the check is a message of its own, as before.
pub(crate) fn can_follow_check(begin: &str, tenant: bool) -> bool {
    tenant && begin.trim().eq_ignore_ascii_case("BEGIN")
}

/// What a failed [`PG_FAIL_IN_TRANSACTION`] message means for the connection it ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PgBeginFailure {
    /// It was inside a transaction (open or aborted): close it and take another.
    InTransaction,
    /// The connection itself failed (I/O, protocol, the server ending the session): close it
    /// and take another.
    Broken,
    /// The server refused a statement of the caller's (`BEGIN ...`, the setting): the
    /// caller's error.
    Refused,
}

impl PgBeginFailure {
    pub(crate) fn of(err: &sqlx::Error) -> Self {
        match err {
            sqlx::Error::Database(db) => {
                let code = db.code();
                let code = code.as_deref().unwrap_or("");
                let class = code.get(..2).unwrap_or("");
                if (code == "22P02" && db.message().contains(PG_IN_TRANSACTION_MARKER))
                    || code == "25P02"
                {
                    // Our check's error, or (25P02) the check ran in a block aborted by an
                    // earlier error.
                    PgBeginFailure::InTransaction
                } else if matches!(class, "08" | "57") || code == "25P03" || is_fatal(&**db) {
                    // Connection exceptions, operator intervention, the server ending a
                    // session left idle in a transaction (25P03), any FATAL: the session is
                    // gone.
                    PgBeginFailure::Broken
                } else {
                    PgBeginFailure::Refused
                }
            }
            _ => PgBeginFailure::Broken,
        }
    }
}

/// Whether the server ended the session with this error (severity `FATAL` or `PANIC`).
fn is_fatal(db: &dyn sqlx::error::DatabaseError) -> bool {
    #[cfg(feature = "postgres")]
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        use sqlx::postgres::PgSeverity;
        return matches!(pg.severity(), PgSeverity::Fatal | PgSeverity::Panic);
    }
    let _ = db;
    false
}

/// The one message that opens a transaction on PostgreSQL: with `check`,
/// [`PG_FAIL_IN_TRANSACTION`] first; then `begin`; then, for a tenant,
/// `SELECT set_config('<setting>', '<value>', true)` with both as escaped literals.
///
/// # Errors
/// A NUL character in the setting or its value ([`push_pg_literal`]).
pub(crate) fn pg_begin_message(
    begin: &str,
    check: bool,
    setting: Option<(&str, &str)>,
) -> Result<String, sqlx::Error> {
    debug_assert!(!check || can_follow_check(begin, setting.is_some()));
    let mut sql = String::with_capacity(
        PG_FAIL_IN_TRANSACTION.len()
            + begin.len()
            + setting.map_or(0, |(name, value)| name.len() + value.len() + 40),
    );
    if check {
        sql.push_str(PG_FAIL_IN_TRANSACTION);
        sql.push_str(";\n");
    }
    sql.push_str(begin);
    if let Some((name, value)) = setting {
        // `begin` holds only keywords and commas (`TxOptions::checked_begin`): no comment or
        // quote of it can swallow what follows. On a line of its own all the same.
        sql.push_str("\n;\nSELECT set_config(");
        push_pg_literal(&mut sql, name)?;
        sql.push_str(", ");
        push_pg_literal(&mut sql, value)?;
        sql.push_str(", true)");
    }
    Ok(sql)
}

/// Appends `value` to `sql` as a PostgreSQL escape-string literal (`E'...'`: quotes doubled,
/// backslashes doubled, every character outside printable ASCII as a `\uXXXX` or
/// `\UXXXXXXXX` escape), which reads back as `value` whatever `standard_conforming_strings`
/// says. The literal is plain ASCII, so no client encoding can read a byte of it as the lead
/// byte of a character that swallows a backslash (as bytes of UTF-8 can under SJIS or GBK).
///
/// # Errors
/// A NUL character, which no PostgreSQL text can hold (and which would end the message).
pub(crate) fn push_pg_literal(sql: &mut String, value: &str) -> Result<(), sqlx::Error> {
    if value.contains('\0') {
        return Err(sqlx::Error::Protocol(
            "a NUL character cannot be sent in a PostgreSQL string".into(),
        ));
    }
    sql.reserve(value.len() + 3);
    sql.push_str("E'");
    for c in value.chars() {
        match c {
            '\'' => sql.push_str("''"),
            '\\' => sql.push_str("\\\\"),
            ' '..='~' => sql.push(c),
            c if u32::from(c) <= 0xffff => {
                let _ = write!(sql, "\\u{:04X}", u32::from(c));
            }
            c => {
                let _ = write!(sql, "\\U{:08X}", u32::from(c));
            }
        }
    }
    sql.push('\'');
    Ok(())
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
/// transaction back by itself, or may have: the statements that follow would then run in
/// autocommit mode, each committed on its own, so the transaction is poisoned (it can only be
/// rolled back) rather than trusted.
///
/// - MySQL/MariaDB: a deadlock (error 1213, SQLSTATE `40001`); a lock wait timeout (error
///   1205), which rolls the whole transaction back when the server runs with
///   `innodb_rollback_on_timeout`; MariaDB's snapshot isolation conflict (error 1020, "Record
///   has changed since last read", the default from MariaDB 11.6.2 with
///   `innodb_snapshot_isolation`), which rolls it back as a deadlock does; and InnoDB's lock
///   table full (error 1206). The numbers are told in any language with the `mysql` feature
///   (their SQLSTATE is the generic `HY000`), the English messages without it.
/// - SQLite: `SQLITE_FULL`, `SQLITE_IOERR`, `SQLITE_BUSY` and `SQLITE_NOMEM` (primary result
///   codes 13, 10, 5, 7), after which SQLite "may or may not" have rolled the transaction back.
pub(crate) fn rolled_back_by_server(dialect: Dialect, err: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = err else {
        return false;
    };
    match dialect {
        Dialect::MySql => {
            db.code().as_deref() == Some("40001")
                || matches!(mysql_error_number(db.as_ref()), Some(1020 | 1205 | 1206))
                || db.message().starts_with("Lock wait timeout exceeded")
                || db
                    .message()
                    .starts_with("Record has changed since last read")
                || db
                    .message()
                    .starts_with("The total number of locks exceeds")
        }
        Dialect::Sqlite => db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 7 | 10 | 13)),
        _ => false,
    }
}

/// The server's error number of a MySQL/MariaDB error: 1205 has the generic SQLSTATE `HY000`,
/// and its message is in the server's language (`lc_messages`).
#[cfg(feature = "mysql")]
fn mysql_error_number(db: &dyn sqlx::error::DatabaseError) -> Option<u16> {
    db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .map(sqlx::mysql::MySqlDatabaseError::number)
}

/// Without sqlx's MySQL driver, no error is a MySQL one (the message check remains).
#[cfg(not(feature = "mysql"))]
fn mysql_error_number(_: &dyn sqlx::error::DatabaseError) -> Option<u16> {
    None
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A database error with a code and a message, as a driver reports one.
    #[derive(Debug)]
    struct Reported(&'static str, &'static str);

    impl std::fmt::Display for Reported {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.1)
        }
    }

    impl std::error::Error for Reported {}

    impl sqlx::error::DatabaseError for Reported {
        fn message(&self) -> &str {
            self.1
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    #[test]
    fn errors_that_may_roll_the_whole_transaction_back() {
        let err = |code, message| sqlx::Error::Database(Box::new(Reported(code, message)));
        let cases = [
            (
                Dialect::MySql,
                err("40001", "Deadlock found when trying to get lock"),
                true,
            ),
            (
                Dialect::MySql,
                err(
                    "HY000",
                    "Lock wait timeout exceeded; try restarting transaction",
                ),
                true,
            ),
            (
                Dialect::MySql,
                err("23000", "Duplicate entry '1' for key 'PRIMARY'"),
                false,
            ),
            (Dialect::Sqlite, err("13", "database or disk is full"), true),
            (Dialect::Sqlite, err("3338", "disk I/O error"), true), // SQLITE_IOERR_FSYNC
            (Dialect::Sqlite, err("5", "database is locked"), true),
            (Dialect::Sqlite, err("7", "out of memory"), true),
            (
                Dialect::Sqlite,
                err("2067", "UNIQUE constraint failed"),
                false,
            ),
            (Dialect::Sqlite, err("1", "no such table: t"), false),
            (
                Dialect::Postgres,
                err("40001", "could not serialize access"),
                false,
            ),
        ];
        for (dialect, err, expected) in cases {
            assert_eq!(
                rolled_back_by_server(dialect, &err),
                expected,
                "{dialect:?}: {err}"
            );
        }
        assert!(!rolled_back_by_server(
            Dialect::MySql,
            &sqlx::Error::PoolClosed
        ));
    }

    /// Reads an `E'...'` literal back the way PostgreSQL does for the escapes we write, and
    /// refuses anything else (a lone quote, a backslash escape we never write).
    fn read_back(literal: &str) -> Option<String> {
        let inner = literal.strip_prefix("E'")?.strip_suffix('\'')?;
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\'' => {
                    if chars.next()? != c {
                        return None;
                    }
                    out.push(c);
                }
                '\\' => match chars.next()? {
                    '\\' => out.push('\\'),
                    kind @ ('u' | 'U') => {
                        let digits: String = chars
                            .by_ref()
                            .take(if kind == 'u' { 4 } else { 8 })
                            .collect();
                        out.push(char::from_u32(u32::from_str_radix(&digits, 16).ok()?)?);
                    }
                    _ => return None,
                },
                c if c.is_ascii_graphic() || c == ' ' => out.push(c),
                _ => return None,
            }
        }
        Some(out)
    }

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        let mut sql = String::new();
        push_pg_literal(&mut sql, r"o'brien\'; DROP TABLE t; --").unwrap();
        assert_eq!(sql, r"E'o''brien\\''; DROP TABLE t; --'");
        assert!(push_pg_literal(&mut String::new(), "a\0b").is_err());
    }

    proptest! {
        /// Any text without NUL is written as one literal that reads back as itself.
        #[test]
        fn literals_read_back(value in any::<String>().prop_filter("no NUL", |v| !v.contains('\0'))) {
            let mut sql = String::new();
            push_pg_literal(&mut sql, &value).unwrap();
            prop_assert_eq!(read_back(&sql), Some(value));
        }
    }

    #[test]
    fn begin_messages() {
        assert_eq!(pg_begin_message("BEGIN", false, None).unwrap(), "BEGIN");
        let full = pg_begin_message("BEGIN", true, Some(("app.tenant_id", "o'k"))).unwrap();
        assert_eq!(
            full,
            format!("{PG_FAIL_IN_TRANSACTION};\nBEGIN\n;\nSELECT set_config(E'app.tenant_id', E'o''k', true)")
        );
        assert!(pg_begin_message("BEGIN", false, Some(("app.x", "a\0b"))).is_err());
    }

    #[test]
    fn only_a_plain_begin_with_a_tenant_follows_the_check() {
        assert!(can_follow_check("BEGIN", true));
        assert!(can_follow_check(" begin ", true));
        assert!(
            !can_follow_check("BEGIN", false),
            "SET TRANSACTION may come first"
        );
        assert!(!can_follow_check(
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            true
        ));
        assert!(!can_follow_check("START TRANSACTION", true));
    }

    #[test]
    fn literals_are_ascii() {
        let mut sql = String::new();
        push_pg_literal(&mut sql, "é\u{202e}🦀").unwrap();
        assert_eq!(sql, r"E'\u00E9\u202E\U0001F980'");
    }

    #[test]
    fn begin_failures_are_told_apart() {
        assert_eq!(
            PgBeginFailure::of(&sqlx::Error::PoolClosed),
            PgBeginFailure::Broken
        );
        let io = sqlx::Error::Io(std::io::Error::other("reset"));
        assert_eq!(PgBeginFailure::of(&io), PgBeginFailure::Broken);
    }
}
