//! [`Propagation`] and [`TxOptions`]: how a block relates to the transaction already open.

use std::borrow::Cow;

/// How a [`transaction_with`](crate::TxPool::transaction_with) block relates to a transaction
/// that is already open in the context: the modes of Spring's `@Transactional` and
/// @nestjs-cls/transactional.
///
/// | Mode | No transaction open | Inside a transaction |
/// |---|---|---|
/// | [`Nested`](Propagation::Nested) (the default, [`transaction`](crate::TxPool::transaction)) | begins one | a savepoint: its failure undoes its own work only |
/// | [`Required`](Propagation::Required) | begins one | joins it: a failure marks the whole transaction rollback-only |
/// | [`RequiresNew`](Propagation::RequiresNew) | begins one | suspends it and begins an independent one on another connection |
/// | [`Mandatory`](Propagation::Mandatory) | error, the block does not run | joins it, as `Required` |
/// | [`Never`](Propagation::Never) | runs without one (each query commits on its own) | error, the block does not run |
///
/// ```
/// # #[cfg(feature = "sqlite")]
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
/// use contextflow_sqlx::{Propagation, TxPool};
///
/// # let dir = tempfile::tempdir().unwrap();
/// # let url = format!("sqlite://{}?mode=rwc", dir.path().join("db").display());
/// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(2).connect(&url).await?;
/// let db = TxPool::new(pool);
/// db.execute(sqlx::query("CREATE TABLE audit (what TEXT)")).await?;
///
/// let failed: Result<(), sqlx::Error> = db
///     .transaction(|| async {
///         // An audit record that must survive the request's rollback: its own transaction.
///         db.transaction_with(Propagation::RequiresNew, || async {
///             db.execute(sqlx::query("INSERT INTO audit VALUES ('attempt')")).await
///         })
///         .await?;
///         Err(sqlx::Error::RowNotFound)
///     })
///     .await;
/// assert!(failed.is_err());
/// let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit").fetch_one(&db).await?;
/// assert_eq!(n, 1);
/// # Ok(()) }
/// # #[cfg(not(feature = "sqlite"))] fn main() {}
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Propagation {
    /// A new transaction, or a savepoint inside the current one (Spring's `NESTED`): what
    /// [`transaction`](crate::TxPool::transaction) does.
    #[default]
    Nested,
    /// Join the current transaction, or begin one (Spring's `REQUIRED`). The block's `Err` or
    /// panic (or its future being dropped) marks the transaction rollback-only: its end rolls
    /// back and reports [`TransactionClosed`](crate::TransactionClosed), even if an enclosing
    /// block swallowed the error.
    Required,
    /// Always a new top-level transaction, on a connection of its own, committed or rolled
    /// back when the block ends whatever the enclosing transaction does (Spring's
    /// `REQUIRES_NEW`). The enclosing transaction is suspended: inside the block, queries see
    /// the new one. Each such block holds a second connection: a pool that every request fills
    /// this way has none left (a task that holds all connections gets
    /// [`ConnectionBusy`](crate::ConnectionBusy) instead of waiting forever), and the new
    /// transaction waits for row locks the suspended one holds.
    RequiresNew,
    /// Join the current transaction; outside one, the block does not run and a
    /// [`PropagationError`](crate::PropagationError) is returned (Spring's `MANDATORY`).
    Mandatory,
    /// Run without a transaction; inside one, the block does not run and a
    /// [`PropagationError`](crate::PropagationError) is returned (Spring's `NEVER`).
    Never,
}

/// Options for [`transaction_with`](crate::TxPool::transaction_with): a [`Propagation`] and
/// the statement that begins a top-level transaction.
///
/// A `&'static str` or a `String` converts into the `BEGIN` statement, a [`Propagation`] into
/// that mode.
///
/// ```
/// use contextflow_sqlx::{Propagation, TxOptions};
///
/// let options = TxOptions::new()
///     .propagation(Propagation::Required)
///     .begin("BEGIN ISOLATION LEVEL SERIALIZABLE");
/// assert_eq!(options.get_propagation(), Propagation::Required);
/// assert_eq!(options.get_begin(), "BEGIN ISOLATION LEVEL SERIALIZABLE");
/// assert_eq!(TxOptions::from("BEGIN IMMEDIATE").get_propagation(), Propagation::Nested);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxOptions {
    propagation: Propagation,
    begin: Option<Cow<'static, str>>,
}

// ===== impl TxOptions =====

impl TxOptions {
    /// [`Propagation::Nested`], beginning with a plain `BEGIN`.
    ///
    /// ```
    /// assert_eq!(contextflow_sqlx::TxOptions::new().get_begin(), "BEGIN");
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the propagation mode.
    ///
    /// ```
    /// use contextflow_sqlx::{Propagation, TxOptions};
    /// let options = TxOptions::new().propagation(Propagation::Mandatory);
    /// assert_eq!(options.get_propagation(), Propagation::Mandatory);
    /// ```
    pub fn propagation(mut self, propagation: Propagation) -> Self {
        self.propagation = propagation;
        self
    }

    /// Sets the statement that begins a top-level transaction: `BEGIN ISOLATION LEVEL
    /// SERIALIZABLE` or `BEGIN READ ONLY` on PostgreSQL, `BEGIN IMMEDIATE` on SQLite (take the
    /// write lock at once), `START TRANSACTION READ ONLY` on MySQL. It must start with `BEGIN`
    /// or `START TRANSACTION` and hold only keywords, white space and commas (no `;`, quote or
    /// comment), or the block fails with [`sqlx::Error::BeginFailed`]. Inside a transaction it does not apply (the enclosing
    /// transaction's mode holds), except with [`Propagation::RequiresNew`].
    ///
    /// ```
    /// let options = contextflow_sqlx::TxOptions::new().begin("BEGIN READ ONLY");
    /// assert_eq!(options.get_begin(), "BEGIN READ ONLY");
    /// ```
    pub fn begin(mut self, statement: impl Into<Cow<'static, str>>) -> Self {
        self.begin = Some(statement.into());
        self
    }

    /// The propagation mode.
    ///
    /// ```
    /// use contextflow_sqlx::{Propagation, TxOptions};
    /// assert_eq!(TxOptions::new().get_propagation(), Propagation::Nested);
    /// ```
    pub fn get_propagation(&self) -> Propagation {
        self.propagation
    }

    /// The statement that begins a top-level transaction.
    ///
    /// ```
    /// assert_eq!(contextflow_sqlx::TxOptions::new().get_begin(), "BEGIN");
    /// ```
    pub fn get_begin(&self) -> &str {
        self.begin.as_deref().unwrap_or("BEGIN")
    }

    /// The begin statement, if it is one: keywords (and commas) starting with `BEGIN` or
    /// `START TRANSACTION`.
    pub(crate) fn checked_begin(&self) -> Result<&str, sqlx::Error> {
        let statement = self.get_begin();
        let trimmed = statement.trim_start();
        let starts = |prefix: &str| {
            trimmed
                .get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
        };
        // Only keywords and commas: no `;`, quote, comment or dollar quote, so nothing that
        // follows the statement in the message that opens the transaction (the tenant's
        // `set_config` with its escaped literal) can be read as part of it.
        let keywords_only = statement.bytes().all(|b| {
            b.is_ascii_alphanumeric() || b.is_ascii_whitespace() || b == b',' || b == b'_'
        });
        if (starts("BEGIN") || starts("START TRANSACTION")) && keywords_only {
            Ok(statement)
        } else {
            Err(sqlx::Error::BeginFailed)
        }
    }
}

impl From<Propagation> for TxOptions {
    fn from(propagation: Propagation) -> Self {
        TxOptions::new().propagation(propagation)
    }
}

impl From<&'static str> for TxOptions {
    fn from(statement: &'static str) -> Self {
        TxOptions::new().begin(statement)
    }
}

impl From<String> for TxOptions {
    fn from(statement: String) -> Self {
        TxOptions::new().begin(statement)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_statements_are_checked() {
        for ok in [
            "BEGIN",
            "begin immediate",
            "  BEGIN ISOLATION LEVEL SERIALIZABLE",
            "START TRANSACTION READ ONLY",
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY,\n DEFERRABLE",
            "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ WRITE",
        ] {
            assert!(TxOptions::from(ok).checked_begin().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "SELECT 1",
            "BEGIN; COMMIT",
            "COMMIT",
            "BEG",
            "é",
            "STARTTRANSACTION",
            // Whatever could make the rest of the message part of the statement.
            "BEGIN ISOLATION LEVEL SERIALIZABLE /* reports",
            "BEGIN -- note",
            "BEGIN 'x'",
            "BEGIN E'x",
            "BEGIN $$",
            "BEGIN \"x",
            "BEGIN READ ONLY\\",
        ] {
            assert!(
                matches!(
                    TxOptions::from(bad).checked_begin(),
                    Err(sqlx::Error::BeginFailed)
                ),
                "{bad}"
            );
        }
    }
}
