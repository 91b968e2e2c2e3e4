//! The errors of contextflow-sqlx's own, one type per family, and how they travel.
//!
//! Repository code keeps a single error type, [`sqlx::Error`]: each error below reaches the
//! caller inside a [`sqlx::Error::Io`] (the `io::ErrorKind` says which family it is), and each
//! type's `find` picks it out again. The one exception is [`SetupError`], returned by the
//! start-up check of a [`TenantPool`](crate::TenantPool) directly.

use std::{error::Error, fmt, io, panic::Location};

use crate::propagation::Propagation;

/// The transaction bound to the current context can no longer be used.
///
/// Code normally never sees this: a query inside a [`transaction`](crate::TxPool::transaction)
/// block runs before the block ends. It shows up when the transaction's context outlives the
/// block (a task given a full [`Snapshot::capture`](contextflow::Snapshot::capture) that still
/// runs after the block returned), or when the transaction is *poisoned*: it is still open but
/// may only be rolled back, because a savepoint could not be rolled back, the database rolled
/// the transaction back on its own, or may have (a MySQL deadlock or lock wait timeout; a
/// SQLite disk-full, I/O, busy or out-of-memory error), a statement outside contextflow-sqlx
/// ended it, or a block joined with [`Propagation::Required`] failed (Spring's
/// "rollback-only").
///
/// It reaches callers inside a [`sqlx::Error::Io`] of kind
/// [`NotConnected`](std::io::ErrorKind::NotConnected); [`TransactionClosed::find`] picks it out.
///
/// ```
/// # #[cfg(feature = "sqlite")]
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
/// use contextflow::{FutureExt as _, Snapshot};
/// use contextflow_sqlx::{TransactionClosed, TxPool};
///
/// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(2).connect("sqlite::memory:").await?;
/// let db = TxPool::new(pool);
/// // A snapshot taken inside the block keeps the transaction after the block ended...
/// let inside = db.transaction(|| async { Ok::<_, sqlx::Error>(Snapshot::capture()) }).await?;
/// // ...and using it then is an error, never a silent fall-back to the pool.
/// let late = async { db.execute(sqlx::query("SELECT 1")).await }.with_snapshot(inside).await;
/// let err = late.unwrap_err();
/// let closed = TransactionClosed::find(&err).expect("a TransactionClosed");
/// assert!(!closed.is_poisoned());
/// # Ok(()) }
/// # #[cfg(not(feature = "sqlite"))] fn main() {}
/// ```
#[derive(Debug)]
pub struct TransactionClosed {
    reason: ClosedReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClosedReason {
    /// Committed or rolled back already.
    Ended,
    /// A savepoint could not be rolled back.
    SavepointRollbackFailed,
    /// The database rolled the whole transaction back by itself.
    RolledBackByServer,
    /// A statement that contextflow-sqlx did not issue ended the transaction.
    EndedOutside,
    /// A joined block (`Propagation::Required` or `Mandatory`) failed.
    RollbackOnly,
    /// A statement's future was dropped before its result: it may have run.
    StatementDropped,
}

/// A query would wait for a connection that the same task holds: it fails at once instead of
/// waiting forever.
///
/// Inside a transaction, a [`Conn`](crate::Conn) or a row stream from
/// [`fetch`](sqlx::Executor::fetch) that is kept alive holds the transaction's only connection:
/// another query or a nested block of the same task would wait for it, and it waits for them.
/// Outside a transaction the same happens when the task holds every connection of the pool
/// (pool connections kept in `Conn`s, transactions suspended by
/// [`Propagation::RequiresNew`]). Drop the `Conn` (or finish the stream) first.
///
/// It reaches callers inside a [`sqlx::Error::Io`] of kind
/// [`WouldBlock`](std::io::ErrorKind::WouldBlock); [`ConnectionBusy::find`] picks it out.
///
/// ```
/// # #[cfg(feature = "sqlite")]
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
/// use contextflow_sqlx::{ConnectionBusy, TxPool};
///
/// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
/// let db = TxPool::new(pool);
/// db.transaction(|| async {
///     let conn = db.acquire().await?; // holds the transaction's connection...
///     let err = db.execute(sqlx::query("SELECT 1")).await.unwrap_err(); // ...so this cannot run
///     let busy = ConnectionBusy::find(&err).expect("a ConnectionBusy");
///     assert!(busy.held_at().is_some()); // where `conn` was acquired
///     drop(conn);
///     db.execute(sqlx::query("SELECT 1")).await?; // now it can
///     Ok::<_, sqlx::Error>(())
/// })
/// .await?;
/// # Ok(()) }
/// # #[cfg(not(feature = "sqlite"))] fn main() {}
/// ```
#[derive(Debug)]
pub struct ConnectionBusy {
    held_at: Option<&'static Location<'static>>,
    called_at: &'static Location<'static>,
    pool_exhausted: bool,
}

/// A `COMMIT` was sent but its answer never came (the connection broke): the transaction may
/// or may not have committed.
///
/// contextflow-sqlx never assumes either outcome: the block's caller gets this error, and a
/// log line at `error` level (emitted in the caller's context, so it carries the request's
/// fields) says so. When the block's future itself is dropped during `COMMIT`, there is no
/// caller left to return an error to: the log line (at `warn`) is emitted while the future is
/// dropped, and a second one says how it ended once the connection has been examined.
/// After-commit hooks do not run when the outcome is unknown.
///
/// It reaches callers inside a [`sqlx::Error::Io`] of kind [`Other`](std::io::ErrorKind::Other)
/// whatever the underlying error was (its own kind could be another family's, such as
/// `NotConnected`, and a caller that sorts errors by kind must never take a commit that may
/// have happened for one that did not); [`CommitUnknown::find`] picks it out, and
/// [`CommitUnknown::cause`] gives the underlying error.
///
/// ```
/// use contextflow_sqlx::CommitUnknown;
///
/// fn report(err: &sqlx::Error) -> &'static str {
///     match CommitUnknown::find(err) {
///         Some(_) => "maybe committed: check before retrying",
///         None => "not committed",
///     }
/// }
/// assert_eq!(report(&sqlx::Error::PoolTimedOut), "not committed");
/// # let _ = report;
/// ```
#[derive(Debug)]
pub struct CommitUnknown {
    source: sqlx::Error,
}

/// A block asked for a [`Propagation`] that the current context does not allow:
/// [`Mandatory`](Propagation::Mandatory) outside a transaction,
/// [`Never`](Propagation::Never) inside one. The block did not run.
///
/// It reaches callers inside a [`sqlx::Error::Io`] of kind
/// [`InvalidInput`](std::io::ErrorKind::InvalidInput); [`PropagationError::find`] picks it out.
///
/// ```
/// # #[cfg(feature = "sqlite")]
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
/// use contextflow_sqlx::{Propagation, PropagationError, TxPool};
///
/// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
/// let db = TxPool::new(pool);
/// let err = db
///     .transaction_with(Propagation::Mandatory, || async { Ok::<_, sqlx::Error>(()) })
///     .await
///     .unwrap_err();
/// let refused = PropagationError::find(&err).expect("a PropagationError");
/// assert_eq!(refused.propagation(), Propagation::Mandatory);
/// # Ok(()) }
/// # #[cfg(not(feature = "sqlite"))] fn main() {}
/// ```
#[derive(Debug)]
pub struct PropagationError {
    propagation: Propagation,
    called_at: &'static Location<'static>,
}

/// A statement of a [`TenantPool`](crate::TenantPool) found no usable tenant in the context,
/// or found a different one than its transaction's: it did not run (fail closed).
///
/// It reaches callers inside a [`sqlx::Error::Io`] of kind
/// [`PermissionDenied`](std::io::ErrorKind::PermissionDenied); [`TenantError::find`] picks it
/// out. [`location`](TenantError::location) is the call into contextflow-sqlx that failed (for
/// statements run through sqlx's own `query(..).fetch_*(&db)`, a line inside sqlx).
///
/// ```
/// use contextflow_sqlx::TenantError;
///
/// let err = sqlx::Error::RowNotFound;
/// assert!(TenantError::find(&err).is_none());
/// ```
#[derive(Debug)]
pub struct TenantError {
    kind: TenantErrorKind,
    location: &'static Location<'static>,
}

/// What was wrong with the tenant, in a [`TenantError`].
///
/// ```
/// use contextflow_sqlx::TenantErrorKind;
/// assert_ne!(TenantErrorKind::Missing, TenantErrorKind::Changed);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TenantErrorKind {
    /// No tenant is bound in the context (unauthenticated code, or a job that did not set one).
    Missing,
    /// The tenant in the context is not the one the current transaction was opened for.
    Changed,
    /// The tenant is empty, longer than 256 bytes or contains a NUL byte.
    Invalid,
}

/// Why [`TenantPool`](crate::TenantPool)'s start-up check refused to build the pool.
///
/// ```
/// use contextflow_sqlx::{Refusal, SetupError};
///
/// let err = SetupError::Refused(vec![Refusal::Superuser { role: "postgres".into() }]);
/// assert!(err.to_string().contains("superuser"));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum SetupError {
    /// The check itself could not run.
    Database(sqlx::Error),
    /// The database is not set up for row-level security: every problem found.
    Refused(Vec<Refusal>),
}

/// One problem found by [`TenantPool`](crate::TenantPool)'s start-up check.
///
/// ```
/// use contextflow_sqlx::Refusal;
///
/// let refusal = Refusal::NotForced { table: "public.orders".into() };
/// assert_eq!(
///     refusal.to_string(),
///     "table public.orders: row-level security is not forced (ALTER TABLE .. FORCE ROW LEVEL SECURITY)"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The pool's database is not PostgreSQL.
    NotPostgres {
        /// The database it is.
        database: String,
    },
    /// The pool's role is a superuser: row-level security never applies to it.
    Superuser {
        /// The role.
        role: String,
    },
    /// The pool's role has `BYPASSRLS`.
    BypassRls {
        /// The role.
        role: String,
    },
    /// The session's user is a superuser that switched role (`SET ROLE`): `RESET ROLE` undoes it.
    SessionSuperuser {
        /// The session user.
        role: String,
    },
    /// The pool's role owns (or is a member of the owner of) a table with a tenant column: an
    /// owner can turn row-level security off.
    OwnsTable {
        /// `schema.table`.
        table: String,
    },
    /// A table with a tenant column does not have row-level security enabled.
    NotEnabled {
        /// `schema.table`.
        table: String,
    },
    /// A table with a tenant column does not have row-level security forced.
    NotForced {
        /// `schema.table`.
        table: String,
    },
    /// A table with a tenant column has no policy (with row-level security on, it shows nothing).
    NoPolicy {
        /// `schema.table`.
        table: String,
    },
    /// The pool's role can become (`SET ROLE`, as a member) a role that is a superuser or has
    /// `BYPASSRLS`: one statement would take every later user of that connection out of
    /// row-level security.
    CanBecome {
        /// The pool's role.
        role: String,
        /// The role it can become.
        target: String,
    },
    /// The pool's role (or the session's user) has `CREATEROLE`: it could grant itself a
    /// role that bypasses row-level security.
    CreateRole {
        /// The pool's role.
        role: String,
    },
    /// A table with a tenant column has a permissive policy that applies to the pool's role
    /// and reads neither the tenant setting nor a function of the database's own (`USING
    /// (true)`, say): permissive policies are combined with `OR`, so every tenant sees and
    /// writes what it allows. A policy that calls a function of its own is trusted to read
    /// the setting there, and a table whose restrictive policy for the same command reads it
    /// is not refused (restrictive policies are combined with `AND`).
    PolicyIgnoresTenant {
        /// `schema.table`.
        table: String,
        /// The policies, by name, comma-separated.
        policies: String,
    },
    /// The pool's role may `TRUNCATE` a table with a tenant column: row-level security does
    /// not apply to `TRUNCATE`, which empties the table for every tenant.
    CanTruncate {
        /// `schema.table`.
        table: String,
    },
    /// A view with a tenant column runs with its owner's rights (no `security_invoker`), so the
    /// owner's exemption from row-level security applies to everyone who reads it.
    ViewWithoutSecurityInvoker {
        /// `schema.view`.
        view: String,
    },
    /// A materialized view with a tenant column: row-level security does not apply to it.
    MaterializedView {
        /// `schema.view`.
        view: String,
    },
}

// ===== impl TransactionClosed =====

impl TransactionClosed {
    /// The `TransactionClosed` inside `err`, if `err` is one.
    ///
    /// ```
    /// use contextflow_sqlx::TransactionClosed;
    ///
    /// assert!(TransactionClosed::find(&sqlx::Error::PoolTimedOut).is_none());
    /// ```
    pub fn find(err: &sqlx::Error) -> Option<&TransactionClosed> {
        find(err)
    }

    /// Whether the transaction is still open but may only be rolled back (see the type's
    /// docs), rather than already ended.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// use contextflow_sqlx::{Propagation, TransactionClosed, TxPool};
    ///
    /// # let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// let db = TxPool::new(pool);
    /// let result = db
    ///     .transaction(|| async {
    ///         // A joined block that fails marks the whole transaction rollback-only...
    ///         let joined = db
    ///             .transaction_with(Propagation::Required, || async {
    ///                 Err::<(), _>(sqlx::Error::RowNotFound)
    ///             })
    ///             .await;
    ///         assert!(joined.is_err());
    ///         Ok::<_, sqlx::Error>(()) // ...so swallowing its error does not commit
    ///     })
    ///     .await;
    /// let err = result.unwrap_err();
    /// assert!(TransactionClosed::find(&err).unwrap().is_poisoned());
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    pub fn is_poisoned(&self) -> bool {
        self.reason != ClosedReason::Ended
    }

    pub(crate) fn error(reason: ClosedReason) -> sqlx::Error {
        sqlx::Error::Io(io::Error::new(
            io::ErrorKind::NotConnected,
            TransactionClosed { reason },
        ))
    }

    /// The error for a transaction that has already ended.
    pub(crate) fn ended() -> sqlx::Error {
        Self::error(ClosedReason::Ended)
    }
}

impl fmt::Display for TransactionClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.reason {
            ClosedReason::Ended => "the transaction bound to the current context has already ended",
            ClosedReason::SavepointRollbackFailed => {
                "a savepoint of the current transaction failed to roll back (or its rollback was cancelled); the transaction can only be rolled back"
            }
            ClosedReason::RolledBackByServer => {
                "the database rolled the current transaction back, or may have (deadlock, lock wait timeout, SQLite full/I/O/busy error); it can only be rolled back"
            }
            ClosedReason::EndedOutside => {
                "a statement not issued by contextflow-sqlx ended the current transaction; its work is lost"
            }
            ClosedReason::RollbackOnly => {
                "a block that joined the current transaction failed; the transaction can only be rolled back"
            }
            ClosedReason::StatementDropped => {
                "a statement of the current transaction was dropped before its result (a timeout around it, say); it may have run, so the transaction can only be rolled back"
            }
        })
    }
}

impl Error for TransactionClosed {}

// ===== impl ConnectionBusy =====

impl ConnectionBusy {
    /// The `ConnectionBusy` inside `err`, if `err` is one.
    ///
    /// ```
    /// assert!(contextflow_sqlx::ConnectionBusy::find(&sqlx::Error::PoolTimedOut).is_none());
    /// ```
    pub fn find(err: &sqlx::Error) -> Option<&ConnectionBusy> {
        find(err)
    }

    /// Where the connection that blocks the call was acquired, when it is a [`Conn`](crate::Conn)
    /// or a row stream of the current transaction.
    ///
    /// ```
    /// # fn f(busy: &contextflow_sqlx::ConnectionBusy) {
    /// if let Some(location) = busy.held_at() {
    ///     eprintln!("drop the connection acquired at {location} first");
    /// }
    /// # }
    /// # let _ = f;
    /// ```
    pub fn held_at(&self) -> Option<&'static Location<'static>> {
        self.held_at
    }

    /// The call that would have waited.
    ///
    /// ```
    /// # fn f(busy: &contextflow_sqlx::ConnectionBusy) {
    /// eprintln!("this call would wait forever: {}", busy.called_at());
    /// # }
    /// # let _ = f;
    /// ```
    pub fn called_at(&self) -> &'static Location<'static> {
        self.called_at
    }

    pub(crate) fn in_transaction(
        held_at: Option<&'static Location<'static>>,
        called_at: &'static Location<'static>,
    ) -> sqlx::Error {
        Self::wrap(ConnectionBusy {
            held_at,
            called_at,
            pool_exhausted: false,
        })
    }

    pub(crate) fn pool_exhausted(called_at: &'static Location<'static>) -> sqlx::Error {
        Self::wrap(ConnectionBusy {
            held_at: None,
            called_at,
            pool_exhausted: true,
        })
    }

    fn wrap(self) -> sqlx::Error {
        sqlx::Error::Io(io::Error::new(io::ErrorKind::WouldBlock, self))
    }
}

impl fmt::Display for ConnectionBusy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.pool_exhausted {
            write!(
                f,
                "the call at {} needs a connection, but this task already holds every connection \
                 of the pool (in `Conn`s or transactions suspended by REQUIRES_NEW): it would wait forever",
                self.called_at
            )
        } else {
            write!(
                f,
                "the call at {} needs the transaction's connection, but this task holds it",
                self.called_at
            )?;
            if let Some(held_at) = self.held_at {
                write!(f, " (acquired at {held_at})")?;
            }
            f.write_str(": drop that `Conn` or finish that stream first")
        }
    }
}

impl Error for ConnectionBusy {}

// ===== impl CommitUnknown =====

impl CommitUnknown {
    /// The `CommitUnknown` inside `err`, if `err` is one.
    ///
    /// ```
    /// assert!(contextflow_sqlx::CommitUnknown::find(&sqlx::Error::PoolTimedOut).is_none());
    /// ```
    pub fn find(err: &sqlx::Error) -> Option<&CommitUnknown> {
        find(err)
    }

    /// The error the `COMMIT` failed with.
    ///
    /// ```
    /// # fn f(unknown: &contextflow_sqlx::CommitUnknown) {
    /// eprintln!("the connection broke during COMMIT: {}", unknown.cause());
    /// # }
    /// # let _ = f;
    /// ```
    pub fn cause(&self) -> &sqlx::Error {
        &self.source
    }

    pub(crate) fn error(source: sqlx::Error) -> sqlx::Error {
        sqlx::Error::Io(io::Error::other(CommitUnknown { source }))
    }
}

impl fmt::Display for CommitUnknown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the outcome of COMMIT is unknown (the transaction may or may not have committed): {}",
            self.source
        )
    }
}

impl Error for CommitUnknown {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.source)
    }
}

// ===== impl PropagationError =====

impl PropagationError {
    /// The `PropagationError` inside `err`, if `err` is one.
    ///
    /// ```
    /// assert!(contextflow_sqlx::PropagationError::find(&sqlx::Error::PoolTimedOut).is_none());
    /// ```
    pub fn find(err: &sqlx::Error) -> Option<&PropagationError> {
        find(err)
    }

    /// The propagation the block asked for.
    ///
    /// ```
    /// # fn f(err: &contextflow_sqlx::PropagationError) {
    /// eprintln!("{:?} refused", err.propagation());
    /// # }
    /// # let _ = f;
    /// ```
    pub fn propagation(&self) -> Propagation {
        self.propagation
    }

    /// Where the block was opened.
    ///
    /// ```
    /// # fn f(err: &contextflow_sqlx::PropagationError) {
    /// eprintln!("refused at {}", err.location());
    /// # }
    /// # let _ = f;
    /// ```
    pub fn location(&self) -> &'static Location<'static> {
        self.called_at
    }

    pub(crate) fn error(
        propagation: Propagation,
        called_at: &'static Location<'static>,
    ) -> sqlx::Error {
        sqlx::Error::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            PropagationError {
                propagation,
                called_at,
            },
        ))
    }
}

impl fmt::Display for PropagationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.propagation {
            Propagation::Mandatory => write!(
                f,
                "the block at {} requires an enclosing transaction (MANDATORY) and there is none",
                self.called_at
            ),
            Propagation::Never => write!(
                f,
                "the block at {} must not run inside a transaction (NEVER) but does",
                self.called_at
            ),
            other => write!(f, "the block at {} refused {other:?}", self.called_at),
        }
    }
}

impl Error for PropagationError {}

// ===== impl TenantError =====

impl TenantError {
    /// The `TenantError` inside `err`, if `err` is one.
    ///
    /// ```
    /// assert!(contextflow_sqlx::TenantError::find(&sqlx::Error::PoolTimedOut).is_none());
    /// ```
    pub fn find(err: &sqlx::Error) -> Option<&TenantError> {
        find(err)
    }

    /// What was wrong.
    ///
    /// ```
    /// # fn f(err: &contextflow_sqlx::TenantError) {
    /// use contextflow_sqlx::TenantErrorKind;
    /// let unauthenticated = err.kind() == TenantErrorKind::Missing;
    /// # let _ = unauthenticated; }
    /// # let _ = f;
    /// ```
    pub fn kind(&self) -> TenantErrorKind {
        self.kind
    }

    /// The call into contextflow-sqlx that was refused.
    ///
    /// ```
    /// # fn f(err: &contextflow_sqlx::TenantError) {
    /// eprintln!("refused at {}", err.location());
    /// # }
    /// # let _ = f;
    /// ```
    pub fn location(&self) -> &'static Location<'static> {
        self.location
    }

    pub(crate) fn error(
        kind: TenantErrorKind,
        location: &'static Location<'static>,
    ) -> sqlx::Error {
        sqlx::Error::Io(io::Error::new(
            io::ErrorKind::PermissionDenied,
            TenantError { kind, location },
        ))
    }
}

impl fmt::Display for TenantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            TenantErrorKind::Missing => "no tenant is bound in the context",
            TenantErrorKind::Changed => {
                "the tenant in the context is not the current transaction's"
            }
            TenantErrorKind::Invalid => {
                "the tenant is empty, longer than 256 bytes or contains a NUL byte"
            }
        };
        write!(f, "{what}: statement refused at {}", self.location)
    }
}

impl Error for TenantError {}

// ===== impl SetupError =====

impl From<sqlx::Error> for SetupError {
    fn from(err: sqlx::Error) -> Self {
        SetupError::Database(err)
    }
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetupError::Database(err) => write!(f, "the row-level security check failed: {err}"),
            SetupError::Refused(refusals) => {
                f.write_str("row-level security is not set up safely for this pool:")?;
                for refusal in refusals {
                    write!(f, "\n- {refusal}")?;
                }
                Ok(())
            }
        }
    }
}

impl Error for SetupError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            SetupError::Database(err) => Some(err),
            SetupError::Refused(_) => None,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotPostgres { database } => write!(
                f,
                "the database is {database}: row-level security needs PostgreSQL"
            ),
            Refusal::Superuser { role } => write!(
                f,
                "role {role} is a superuser: row-level security never applies to it"
            ),
            Refusal::BypassRls { role } => write!(f, "role {role} has BYPASSRLS"),
            Refusal::SessionSuperuser { role } => write!(
                f,
                "the session user {role} is a superuser (SET ROLE can be undone with RESET ROLE); \
                 connect as the application role"
            ),
            Refusal::OwnsTable { table } => write!(
                f,
                "table {table}: the pool's role owns it (or is a member of its owner) and could turn \
                 row-level security off"
            ),
            Refusal::NotEnabled { table } => write!(
                f,
                "table {table}: row-level security is not enabled (ALTER TABLE .. ENABLE ROW LEVEL SECURITY)"
            ),
            Refusal::NotForced { table } => write!(
                f,
                "table {table}: row-level security is not forced (ALTER TABLE .. FORCE ROW LEVEL SECURITY)"
            ),
            Refusal::NoPolicy { table } => write!(f, "table {table}: no policy"),
            Refusal::CanBecome { role, target } => write!(
                f,
                "role {role} is a member of {target}, a superuser or BYPASSRLS role: SET ROLE \
                 {target} would leave row-level security for every later user of the connection"
            ),
            Refusal::CreateRole { role } => write!(
                f,
                "role {role} (or the session's user) has CREATEROLE: it could grant itself a role \
                 that bypasses row-level security"
            ),
            Refusal::PolicyIgnoresTenant { table, policies } => write!(
                f,
                "table {table}: permissive policy {policies} does not read the tenant setting, \
                 and permissive policies are combined with OR"
            ),
            Refusal::CanTruncate { table } => write!(
                f,
                "table {table}: the pool's role may TRUNCATE it, and row-level security does not \
                 apply to TRUNCATE"
            ),
            Refusal::ViewWithoutSecurityInvoker { view } => write!(
                f,
                "view {view}: reads a tenant table but has not security_invoker = true, so it reads \
                 with its owner's rights"
            ),
            Refusal::MaterializedView { view } => write!(
                f,
                "materialized view {view}: reads a tenant table, and row-level security does not \
                 apply to materialized views"
            ),
        }
    }
}

/// Finds one of our error types inside a `sqlx::Error::Io`.
fn find<E: Error + 'static>(err: &sqlx::Error) -> Option<&E> {
    match err {
        sqlx::Error::Io(io) => io.get_ref()?.downcast_ref(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_unknown_has_a_kind_of_its_own() {
        for cause in [io::ErrorKind::NotConnected, io::ErrorKind::WouldBlock] {
            let err = CommitUnknown::error(sqlx::Error::Io(io::Error::new(cause, "reset")));
            let sqlx::Error::Io(io) = &err else {
                panic!("{err:?}");
            };
            assert_eq!(io.kind(), io::ErrorKind::Other, "{cause:?}");
            assert!(CommitUnknown::find(&err).is_some());
            assert!(TransactionClosed::find(&err).is_none());
            assert!(ConnectionBusy::find(&err).is_none());
        }
    }
}
